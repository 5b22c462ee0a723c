"""Helpers for the cost tests (no tests here): ledger fixtures written through `add_ledger_entry`, and
the figures a cost query must give, computed in Python from raw ledger rows."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.costs.query import Figures, Filters
from tierbatch.db.models import Job, LedgerEntry, Task
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.ledger.rows import ResponseRecord, add_ledger_entry

OVERRIDES = {"my-local-llama": {"input": 0.05, "cached_input": 0.025, "output": 0.10, "batch_discount": 0.5}}


def price_book() -> PriceBook:
    data = default_config_data()
    data["prices"] = OVERRIDES
    return PriceBook(parse_config(data, environ={}))


@dataclass(frozen=True)
class Row:
    tenant: uuid.UUID
    mode: Mode
    model: str
    usage: TokenUsage
    created_at: datetime | None = None
    task_type: str = "classification"
    job: uuid.UUID | None = None
    requested_model: str | None = None

    @property
    def tier(self) -> Tier:
        return Tier.COMPLEX if self.model.startswith("gpt-4o-2") or self.model == "gpt-4o" else Tier.LIGHT


def make_job(session: Session, tenant: uuid.UUID, name: str) -> uuid.UUID:
    job = Job(id=uuid.uuid4(), tenant_id=tenant, name=name, task_type="classification",
              requested_tier=RequestedTier.LIGHT, urgent=False)
    session.add(job)
    session.flush()
    return job.id


def write_rows(session: Session, book: PriceBook, rows: Iterable[Row]) -> list[uuid.UUID]:
    """One finished task and one ledger row per Row (the caller commits); returns the task ids."""
    task_ids = []
    for row in rows:
        task = Task(id=uuid.uuid4(), tenant_id=row.tenant, job_id=row.job, task_type=row.task_type,
                    requested_tier=RequestedTier.AUTO, tier=row.tier, tier_reason="test fixture", urgent=False,
                    request={"messages": []}, status=TaskStatus.SUCCEEDED, finished_at=datetime.now(UTC),
                    attempts=1, mode=row.mode, provider="sim", model=row.requested_model or row.model,
                    served_model=row.model)
        session.add(task)
        session.flush()
        charge = add_ledger_entry(session, book, ResponseRecord(
            tenant_id=row.tenant, task_id=task.id, job_id=row.job, batch_id=None, task_type=row.task_type,
            tier=row.tier, mode=row.mode, provider="sim", requested_model=row.requested_model or row.model,
            served_model=row.model, usage=row.usage))
        session.flush()
        task.cost_usd, task.baseline_cost_usd = charge.cost_usd, charge.baseline_cost_usd
        if row.created_at is not None:
            session.execute(update(LedgerEntry).where(LedgerEntry.task_id == task.id)
                            .values(created_at=row.created_at))
        task_ids.append(task.id)
    session.flush()
    return task_ids


MODELS = ("gpt-4o", "gpt-4o-mini-2024-07-18", "my-local-llama", "mystery-model-x")
TASK_TYPES = ("classification", "extraction", "summarization")


def random_rows(rng: random.Random, tenants: Sequence[uuid.UUID], jobs: dict[uuid.UUID, list[uuid.UUID]],
                start: datetime, days: int, count: int) -> list[Row]:
    rows = []
    for _ in range(count):
        tenant = rng.choice(tenants)
        mode = rng.choice((Mode.IMMEDIATE, Mode.IMMEDIATE, Mode.BATCH, Mode.BATCH, Mode.CACHE, Mode.SHADOW))
        model = "gpt-4o" if mode is Mode.SHADOW else rng.choice(MODELS)
        input_tokens = rng.randint(1, 5000)
        output_tokens = rng.randint(1, 800)
        usage = TokenUsage(input_tokens, rng.choice((0, input_tokens // 2, input_tokens)), output_tokens,
                           rng.choice((0, 0, output_tokens // 3)))
        created = start + timedelta(seconds=rng.randint(0, days * 86_400 - 1))
        rows.append(Row(tenant, mode, model, usage, created, rng.choice(TASK_TYPES),
                        rng.choice([None, *jobs.get(tenant, [])])))
    return rows


# --- expectations ---------------------------------------------------------------------------------

def _q(value: Decimal) -> Decimal:
    return value.quantize(Decimal("1e-10"), ROUND_HALF_UP)


def row_figures(entry: LedgerEntry) -> Figures:
    """What one ledger row adds to a cost query, by the documented rules."""
    cache = entry.mode is Mode.CACHE
    shadow = entry.mode is Mode.SHADOW
    zero = Decimal(0)

    def part(value: Decimal | None) -> Decimal:
        return zero if cache or value is None else value

    reasoning = zero
    if not cache and entry.output_price is not None:
        reasoning = _q(entry.reasoning_tokens * entry.output_price / Decimal(1_000_000))
    cost = entry.cost_usd if entry.cost_usd is not None else zero
    baseline = entry.baseline_cost_usd if (entry.baseline_cost_usd is not None and not shadow) else zero
    savings = zero
    if not shadow and entry.cost_usd is not None and entry.baseline_cost_usd is not None:
        savings = entry.baseline_cost_usd - entry.cost_usd
    return Figures(
        requests=1, unpriced_requests=int(entry.unpriced), input_tokens=entry.input_tokens,
        cached_tokens=entry.cached_tokens, output_tokens=entry.output_tokens,
        reasoning_tokens=entry.reasoning_tokens, input_cost_usd=part(entry.input_cost_usd),
        cached_input_cost_usd=part(entry.cached_input_cost_usd), output_cost_usd=part(entry.output_cost_usd),
        reasoning_cost_usd=reasoning, cost_usd=cost, shadow_cost_usd=cost if shadow else zero,
        baseline_cost_usd=baseline, savings_usd=savings)


def dimension_value(entry: LedgerEntry, name: str) -> Any:
    created = entry.created_at.astimezone(UTC)
    values: dict[str, Any] = {
        "day": created.date().isoformat(),
        "hour": created.replace(minute=0, second=0, microsecond=0).isoformat(),
        "model": entry.served_model, "provider": entry.provider, "tier": entry.tier.value,
        "task_type": entry.task_type, "mode": entry.mode.value,
        "job": str(entry.job_id) if entry.job_id else None, "tenant": str(entry.tenant_id),
    }
    return values[name]


def ledger_entries(session: Session, tenants: Sequence[uuid.UUID]) -> list[LedgerEntry]:
    return list(session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id.in_(tenants))))


def expected_groups(entries: Iterable[LedgerEntry], dims: Sequence[str], filters: Filters
                    ) -> dict[tuple[Any, ...], Figures]:
    groups: dict[tuple[Any, ...], Figures] = {}
    for entry in entries:
        if filters.since is not None and entry.created_at < filters.since:
            continue
        if filters.until is not None and entry.created_at >= filters.until:
            continue
        if filters.tenant_id is not None and entry.tenant_id != filters.tenant_id:
            continue
        if filters.task_type is not None and entry.task_type != filters.task_type:
            continue
        if filters.job_id is not None and entry.job_id != filters.job_id:
            continue
        if filters.mode is not None and entry.mode is not filters.mode:
            continue
        key = tuple(dimension_value(entry, d) for d in dims)
        groups[key] = groups.get(key, Figures()) + row_figures(entry)
    return groups


def figures_from_body(body: dict[str, Any]) -> Figures:
    """A row or totals object of the API answer back into Figures (money from decimal strings)."""
    return Figures.from_row(body)
