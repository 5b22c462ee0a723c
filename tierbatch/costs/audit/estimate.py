"""`tierbatch audit`: what existing calls cost, and what they would cost routed and batched.

Pure logic: no database, no network, never a provider call. This module adds the calls up and prices them;
tierbatch.costs.audit.reading reads the call log or the Batch API pair into calls (its docstring says which
inputs are read and which lines are skipped).

Each call
---------
- **Task type**: ``request.metadata.task_type``, else ``general``.
- **Tier**: :func:`tierbatch.routing.tiers.resolve_tier` with ``request.metadata.tier`` (``light``/``complex``/``auto``;
  anything else counts as ``auto``), the config's ``[routing]`` default for the task type, then the prompt
  heuristic (tools requested → complex). Tenant routing rules and the quality monitor are not consulted: they
  live in the database.
- **Tokens**: ``response.usage`` — ``prompt_tokens`` (cached ⊂ input: ``prompt_tokens_details.cached_tokens``),
  ``completion_tokens`` (reasoning ⊂ output: ``completion_tokens_details.reasoning_tokens``).
- **Actual cost**: the response's ``model`` (then the request's ``model``) priced by :class:`PriceBook`
  (genai-prices, overridden by ``[prices]``), immediate prices for a log, batch prices for a Batch API pair.
  The provider whose ``prices_from`` is used is the one configured for that model in ``[tiers]`` (primary or
  fallback), else the complex tier's provider.
- **Routed cost**: light-tier calls re-priced on the light tier's primary model **with the same token counts**
  (another model would tokenize and answer differently: this is an estimate); complex-tier calls unchanged
  (priced on what served them). Same mode as the actual call (immediate for a log, batch for a pair).
- **Batched cost**: the routed cost, with the ``non_urgent_share`` of each light call at the light model's
  batch price (an expected value: a share of 0.5 prices every light call half immediate, half batch, so the
  figure does not depend on which calls are picked). Complex calls are never batched. For a Batch
  API pair every call was already batched: batched = routed and the share is reported as 1. A light provider
  with ``batch = false`` batches nothing.
- **Savings**: actual − routed and actual − batched.
- **Unpriced**: a call whose actual model, or whose light re-pricing model, has no known price is counted
  (``unpriced_calls``, ``unpriced_models``) and its tokens are summed, but it is left out of every money
  figure (never counted as 0), so the money columns always compare the same calls.

Monthly figures
---------------
A month is 30 days. The covered span is ``--days`` when given, else the time between the earliest and the
latest ``response.created`` (epoch seconds) of the calls read. With no ``created`` or a single instant the
span is unknown: monthly figures are ``null`` and a note asks for ``--days``; nothing is assumed. Monthly
figures are rounded to 6 decimal places; every other money figure is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from tierbatch.base.config import AppConfig, ModelRef
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.ledger.pricing import PriceBook, TokenUsage, UnitPrices
from tierbatch.routing.tiers import resolve_tier

DEFAULT_NON_URGENT_SHARE = Decimal("0.5")
DAYS_PER_MONTH = Decimal(30)
SECONDS_PER_DAY = Decimal(86_400)
SKIPPED_KEPT = 100_000
MONTHLY_QUANTUM = Decimal("0.000001")
GENERAL = "general"

FileRole = Literal["log", "input", "output"]


@dataclass(frozen=True, slots=True)
class AuditOptions:
    non_urgent_share: Decimal = DEFAULT_NON_URGENT_SHARE
    days: Decimal | None = None  # the span the input covers; None: measured from `created`

    def __post_init__(self) -> None:
        if not Decimal(0) <= self.non_urgent_share <= Decimal(1):
            raise ValueError("non_urgent_share must be between 0 and 1")
        if self.days is not None and self.days <= 0:
            raise ValueError("days must be more than 0")


@dataclass(frozen=True, slots=True)
class Skipped:
    file: FileRole
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Call:
    task_type: str
    tier: Tier
    requested_model: str | None
    served_model: str | None
    usage: TokenUsage
    created: int | None


@dataclass(slots=True)
class Figures:
    calls: int = 0
    light_calls: int = 0
    complex_calls: int = 0
    unpriced_calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    actual_cost: Decimal = Decimal(0)
    routed_cost: Decimal = Decimal(0)
    batched_cost: Decimal = Decimal(0)

    @property
    def routed_savings(self) -> Decimal:
        return self.actual_cost - self.routed_cost

    @property
    def batched_savings(self) -> Decimal:
        return self.actual_cost - self.batched_cost

    @property
    def savings_pct(self) -> Decimal | None:
        """Batched savings over the actual cost of the same (priced) calls."""
        if self.actual_cost <= 0:
            return None
        return (self.batched_savings * 100 / self.actual_cost).quantize(Decimal("0.01"), ROUND_HALF_UP)

    def add(self, other: Figures) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


def money_text(value: Decimal | None) -> str | None:
    """Money as a plain decimal string (JSON numbers would go through float)."""
    if value is None:
        return None
    return format(value.normalize(), "f")


def _monthly(value: Decimal, factor: Decimal | None) -> Decimal | None:
    if factor is None:
        return None
    return (value * factor).quantize(MONTHLY_QUANTUM, ROUND_HALF_UP)


def _iso(epoch: int | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


@dataclass
class AuditReport:
    mode: Literal["log", "batch"]
    files: dict[str, str]
    light_model: ModelRef
    complex_model: ModelRef
    non_urgent_share: Decimal  # as applied: 1 for a Batch API pair, 0 when the light provider cannot batch
    lines_read: int
    rows: dict[str, Figures]
    totals: Figures
    first_created: int | None
    last_created: int | None
    days: Decimal | None
    days_source: Literal["--days", "log"] | None
    unpriced_models: dict[str, int]
    skipped: list[Skipped]
    skipped_count: int
    notes: list[str]

    @property
    def calls(self) -> int:
        return self.totals.calls

    @property
    def monthly_factor(self) -> Decimal | None:
        """Months per covered span: monthly figure = figure × factor."""
        return DAYS_PER_MONTH / self.days if self.days else None

    def figures_dict(self, figures: Figures) -> dict[str, Any]:
        factor = self.monthly_factor
        pct = figures.savings_pct
        return {
            "calls": figures.calls, "light_calls": figures.light_calls, "complex_calls": figures.complex_calls,
            "unpriced_calls": figures.unpriced_calls, "input_tokens": figures.input_tokens,
            "cached_tokens": figures.cached_tokens, "output_tokens": figures.output_tokens,
            "reasoning_tokens": figures.reasoning_tokens,
            "actual_cost_usd": money_text(figures.actual_cost),
            "routed_cost_usd": money_text(figures.routed_cost),
            "batched_cost_usd": money_text(figures.batched_cost),
            "routed_savings_usd": money_text(figures.routed_savings),
            "batched_savings_usd": money_text(figures.batched_savings),
            "savings_pct": float(pct) if pct is not None else None,
            "monthly_actual_cost_usd": money_text(_monthly(figures.actual_cost, factor)),
            "monthly_routed_savings_usd": money_text(_monthly(figures.routed_savings, factor)),
            "monthly_batched_savings_usd": money_text(_monthly(figures.batched_savings, factor)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "audit",
            "mode": self.mode,
            "files": self.files,
            "light_model": {"provider": self.light_model.provider, "model": self.light_model.model},
            "complex_model": {"provider": self.complex_model.provider, "model": self.complex_model.model},
            "non_urgent_share": money_text(self.non_urgent_share),
            "lines_read": self.lines_read,
            "calls": self.calls,
            "span": {"first": _iso(self.first_created), "last": _iso(self.last_created),
                     "days": money_text(self.days), "source": self.days_source,
                     "days_per_month": int(DAYS_PER_MONTH)},
            "rows": [{"task_type": name, **self.figures_dict(self.rows[name])} for name in sorted(self.rows)],
            "totals": self.figures_dict(self.totals),
            "unpriced_models": dict(sorted(self.unpriced_models.items())),
            "skipped_count": self.skipped_count,
            "skipped": [{"file": s.file, "line": s.line, "reason": s.reason} for s in self.skipped],
            "skipped_truncated": self.skipped_count > len(self.skipped),
            "notes": self.notes,
        }


# --- the audit ------------------------------------------------------------------------------------------

class Auditor:
    """Adds calls up per task type; knows the config, the prices and the scenario."""

    def __init__(self, config: AppConfig, options: AuditOptions, *, batch_mode: bool,
                 prices: PriceBook | None = None) -> None:
        self.config = config
        self.options = options
        self.batch_mode = batch_mode
        self.prices = prices or PriceBook(config)
        light = config.tiers["light"]
        complex_tier = config.tiers["complex"]
        self.light = ModelRef(provider=light.provider, model=light.model)
        self.complex = ModelRef(provider=complex_tier.provider, model=complex_tier.model)
        self.light_can_batch = config.providers[light.provider].batch
        if batch_mode:
            self.share = Decimal(1)
        elif not self.light_can_batch:
            self.share = Decimal(0)
        else:
            self.share = options.non_urgent_share
        self._providers: dict[str, str] = {}
        for ref in config.configured_models():
            self._providers.setdefault(ref.model, ref.provider)
        self.rows: dict[str, Figures] = {}
        self.unpriced_models: dict[str, int] = {}
        self.skipped: list[Skipped] = []
        self.skipped_count = 0
        self.lines_read = 0
        self.first_created: int | None = None
        self.last_created: int | None = None

    # classification ---------------------------------------------------------------------------------
    def classify(self, body: Mapping[str, Any], where: str) -> tuple[str, Tier] | str:
        """(task type, tier) of a chat completion request body, or why it cannot be classified."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"{where} has no messages"
        if not all(isinstance(message, dict) for message in messages):
            return f"{where}.messages has an item that is not an object"
        metadata = body.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        task_type = metadata.get("task_type")
        task_type = task_type.strip()[:100] if isinstance(task_type, str) and task_type.strip() else GENERAL
        requested = RequestedTier.AUTO
        tier_value = metadata.get("tier")
        if isinstance(tier_value, str):
            try:
                requested = RequestedTier(tier_value.strip().lower())
            except ValueError:
                requested = RequestedTier.AUTO
        tools = bool(body.get("tools") or body.get("functions"))
        try:
            decision = resolve_tier(self.config, requested, task_type, messages, tools_requested=tools)
        except (TypeError, AttributeError):
            return f"{where}.messages has content that is not text or text parts"
        return task_type, decision.tier

    # pricing ----------------------------------------------------------------------------------------
    def _actual_prices(self, call: Call) -> UnitPrices | None:
        for model in (call.served_model, call.requested_model):
            if model is None:
                continue
            provider = self._providers.get(model)
            if provider is None and call.requested_model is not None:
                provider = self._providers.get(call.requested_model)
            prices = self.prices.unit_prices(provider or self.complex.provider, model, batch=self.batch_mode)
            if prices is not None:
                return prices
        return None

    def _unpriced(self, model: str) -> None:
        self.unpriced_models[model] = self.unpriced_models.get(model, 0) + 1

    def add(self, call: Call) -> None:
        row = self.rows.get(call.task_type)
        if row is None:
            row = self.rows[call.task_type] = Figures()
        usage = call.usage
        row.calls += 1
        if call.tier is Tier.LIGHT:
            row.light_calls += 1
        else:
            row.complex_calls += 1
        row.input_tokens += usage.input_tokens
        row.cached_tokens += usage.cached_tokens
        row.output_tokens += usage.output_tokens
        row.reasoning_tokens += usage.reasoning_tokens
        if call.created is not None:
            if self.first_created is None or call.created < self.first_created:
                self.first_created = call.created
            if self.last_created is None or call.created > self.last_created:
                self.last_created = call.created

        actual_prices = self._actual_prices(call)
        if actual_prices is None:
            self._unpriced(call.served_model or call.requested_model or "(no model)")
            row.unpriced_calls += 1
            return
        actual = actual_prices.cost(usage).total
        if call.tier is Tier.COMPLEX:
            routed = batched = actual
        else:
            routed_prices = self.prices.unit_prices(self.light.provider, self.light.model, batch=self.batch_mode)
            batch_prices = (self.prices.unit_prices(self.light.provider, self.light.model, batch=True)
                            if self.share > 0 and not self.batch_mode else None)
            if routed_prices is None or (batch_prices is None and self.share > 0 and not self.batch_mode):
                self._unpriced(self.light.model)
                row.unpriced_calls += 1
                return
            routed = routed_prices.cost(usage).total
            batched = routed if batch_prices is None else (
                self.share * batch_prices.cost(usage).total + (1 - self.share) * routed)
        row.actual_cost += actual
        row.routed_cost += routed
        row.batched_cost += batched

    def skip(self, file: FileRole, line: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_KEPT:
            self.skipped.append(Skipped(file, line, reason))

    # the report -------------------------------------------------------------------------------------
    def report(self, files: dict[str, str]) -> AuditReport:
        totals = Figures()
        for row in self.rows.values():
            totals.add(row)
        days: Decimal | None = None
        days_source: Literal["--days", "log"] | None = None
        notes = [
            "tier: explicit metadata.tier, then the config's [routing] default for the task type, then the "
            "prompt heuristic (tenant routing rules are not consulted)",
            f"routed: light calls re-priced on {self.light.model} with the same token counts (an estimate: "
            "another model uses other token counts); complex calls unchanged",
        ]
        if self.batch_mode:
            notes.append("batched: these calls were already batched (Batch API pair); actual and routed costs "
                         "use batch prices, batched = routed")
        elif not self.light_can_batch:
            notes.append(f"batched: the light provider {self.light.provider!r} has no Batch API (batch = false); "
                         "batched = routed")
        else:
            notes.append(f"batched: {money_text(self.share * 100)}% of light calls (--non-urgent-share) at "
                         f"{self.light.model}'s batch price, counted as that share of every light call; "
                         "complex calls are never batched")
        if self.options.days is not None:
            days, days_source = self.options.days, "--days"
            notes.append(f"span: {money_text(days)} days (--days); a month is 30 days")
        elif self.first_created is not None and self.last_created is not None \
                and self.last_created > self.first_created:
            days = Decimal(self.last_created - self.first_created) / SECONDS_PER_DAY
            days_source = "log"
            notes.append(f"span: {days.quantize(Decimal('0.001'), ROUND_HALF_UP).normalize():f} days between the "
                         "first and the last response `created`; a month is 30 days")
            if days < 1:
                notes.append("span: shorter than a day, the monthly extrapolation is rough (give --days N)")
        else:
            reason = "no response has `created`" if self.first_created is None else \
                "every response has the same `created`"
            notes.append(f"span: unknown ({reason}); monthly figures are not extrapolated: give --days N")
        if totals.unpriced_calls:
            notes.append(f"unpriced: {totals.unpriced_calls} call(s) on models without a known price are counted "
                         "but left out of every money figure (add them under [prices])")
        return AuditReport(
            mode="batch" if self.batch_mode else "log", files=files, light_model=self.light,
            complex_model=self.complex, non_urgent_share=self.share, lines_read=self.lines_read,
            rows=self.rows, totals=totals, first_created=self.first_created, last_created=self.last_created,
            days=days, days_source=days_source, unpriced_models=self.unpriced_models,
            skipped=sorted(self.skipped, key=lambda s: (("log", "input", "output").index(s.file), s.line)),
            skipped_count=self.skipped_count, notes=notes,
        )

