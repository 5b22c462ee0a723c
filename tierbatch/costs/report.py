"""The token report of `GET /v1/costs/report`: per task type, input vs output cost, the cached-token
share, and whether answers grew longer than in the period before (figures as in tierbatch.costs.query).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from tierbatch.base.errors import InvalidInput
from tierbatch.base.states import Mode
from tierbatch.costs.query import (
    MAX_ROWS,
    CostQuery,
    Figures,
    Filters,
    figures_body,
    int_param,
    money_text,
    parse_filters,
    refuse_unknown,
    run_cost_query,
)


@dataclass(frozen=True, slots=True)
class ReportOptions:
    since: datetime
    until: datetime
    tenant_id: uuid.UUID | None
    task_type: str | None
    growth_threshold_pct: int
    min_requests: int


def parse_report_params(params: Mapping[str, Sequence[str]], *, tenant_scope: uuid.UUID | None,
                        now: datetime | None = None) -> ReportOptions:
    """`GET /v1/costs/report`: a period (default: the last 7 days) compared with the one before it."""
    refuse_unknown(params, ("since", "until", "task_type", "tenant_id", "growth_threshold_pct", "min_requests"))
    now = now or datetime.now(UTC)
    filters = parse_filters(params, tenant_scope=tenant_scope, now=now)
    until = filters.until or now
    since = filters.since or until - timedelta(days=7)
    if since >= until:
        raise InvalidInput("since must be before until", param="since")
    return ReportOptions(since, until, filters.tenant_id, filters.task_type,
                         int_param(params, "growth_threshold_pct", 25, 0, 10_000),
                         int_param(params, "min_requests", 10, 1, 1_000_000))


def _per_request(tokens: int, requests: int) -> Decimal | None:
    return (Decimal(tokens) / requests).quantize(Decimal("0.1")) if requests else None


def _share(part: Decimal | int, whole: Decimal | int) -> float | None:
    return round(float(Decimal(part) * 100 / Decimal(whole)), 2) if whole else None


def token_report(session: Session, options: ReportOptions) -> dict[str, Any]:
    """Per task type: input vs output cost, cached-token share, and output tokens per request now vs the
    period before (same length), flagged `verbose` when it grew by more than the threshold. Token
    growth is measured on answered calls (immediate and batch), not on cache hits or shadow calls."""
    length = options.until - options.since
    previous_since = options.since - length

    def by_type_and_mode(since: datetime, until: datetime) -> dict[str, dict[str, Figures]]:
        filters = Filters(since=since, until=until, tenant_id=options.tenant_id, task_type=options.task_type)
        result = run_cost_query(session, CostQuery(("task_type", "mode"), filters, MAX_ROWS))
        out: dict[str, dict[str, Figures]] = {}
        for row in result.rows:
            out.setdefault(row.dims["task_type"], {})[row.dims["mode"]] = row.figures
        return out

    now_rows = by_type_and_mode(options.since, options.until)
    before_rows = by_type_and_mode(previous_since, options.since)
    answered = (Mode.IMMEDIATE.value, Mode.BATCH.value)
    task_types = []
    totals = Figures()
    for task_type in sorted(now_rows):
        modes = now_rows[task_type]
        figures = sum(modes.values(), Figures())
        totals += figures
        served_now = sum((f for m, f in modes.items() if m in answered), Figures())
        served_before = sum((f for m, f in before_rows.get(task_type, {}).items() if m in answered), Figures())
        now_per = _per_request(served_now.output_tokens, served_now.requests)
        before_per = _per_request(served_before.output_tokens, served_before.requests)
        growth = None
        if now_per is not None and before_per:
            growth = float(((now_per - before_per) * 100 / before_per).quantize(Decimal("0.1")))
        enough = served_now.requests >= options.min_requests and served_before.requests >= options.min_requests
        input_cost = figures.input_cost_usd + figures.cached_input_cost_usd
        task_types.append({
            "task_type": task_type, **figures_body(figures),
            "input_side_cost_usd": money_text(input_cost),
            "input_cost_share_pct": _share(input_cost, input_cost + figures.output_cost_usd),
            "output_cost_share_pct": _share(figures.output_cost_usd, input_cost + figures.output_cost_usd),
            "cached_token_share_pct": _share(figures.cached_tokens, figures.input_tokens),
            "output_tokens_per_request": float(now_per) if now_per is not None else None,
            "previous_output_tokens_per_request": float(before_per) if before_per is not None else None,
            "previous_requests": served_before.requests,
            "output_tokens_growth_pct": growth,
            "verbose": bool(enough and growth is not None and growth > options.growth_threshold_pct),
        })
    return {
        "object": "cost_token_report",
        "period": {"since": options.since.isoformat(), "until": options.until.isoformat()},
        "previous_period": {"since": previous_since.isoformat(), "until": options.since.isoformat()},
        "growth_threshold_pct": options.growth_threshold_pct, "min_requests": options.min_requests,
        "task_types": task_types, "totals": figures_body(totals),
    }
