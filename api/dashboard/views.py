"""What each dashboard page shows: its queries (through the domain's read modules) and its charts."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams

from tierbatch.api.context import ApiContext
from tierbatch.api.dashboard.auth import Viewer, sessions_of
from tierbatch.api.dashboard.charts import amount, chart, dataset
from tierbatch.api.serialize import task_body
from tierbatch.base.errors import InvalidInput
from tierbatch.base.states import TERMINAL_TASK_STATUSES, BatchStatus, Mode, Tier
from tierbatch.batching.read import ProviderBatchView, list_provider_batches
from tierbatch.costs.budgets import budget_status
from tierbatch.costs.query import (
    COUNTS,
    DIMENSIONS,
    METRICS,
    OUTPUT_KEYS,
    CostQuery,
    CostResult,
    Figures,
    figures_body,
    parse_cost_query,
    run_cost_query,
)
from tierbatch.db.models import Tenant
from tierbatch.jobs.browse import find_job, find_task, job_tasks, list_jobs_in, task_ledger
from tierbatch.jobs.read import summarize_jobs
from tierbatch.quality.browse import agreement_by_day, events_in, rules_in
from tierbatch.schedules.browse import list_schedules_in, recent_runs
from tierbatch.tenants.store import list_tenants

if TYPE_CHECKING:
    from tierbatch.api.dashboard.pages import PageRequest

RANGE_DAYS = 30
PAGE_ROWS = 200
CHART_BARS = 40
MODES = tuple(m.value for m in Mode)
TERMINAL = frozenset(s.value for s in TERMINAL_TASK_STATUSES)


def session_seconds(ctx: ApiContext) -> int:
    return sessions_of(ctx).ttl_seconds


async def close_session(ctx: ApiContext, token: str) -> None:
    await sessions_of(ctx).close(token)


# --- dates and the cost query ------------------------------------------------------------------------

def _day_param(params: QueryParams, name: str, default: date) -> date:
    text = params.get(name, "").strip()
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{name}: {text!r} is not a date (YYYY-MM-DD)", param=name) from None


def date_range(params: QueryParams, today: date | None = None) -> tuple[date, date]:
    """`since` and `until` (both included), by default the last 30 UTC days with today: whole days, so the
    cost query reads only the daily rollup."""
    today = today or datetime.now(UTC).date()
    until = _day_param(params, "until", today)
    since = _day_param(params, "since", until - timedelta(days=RANGE_DAYS - 1))
    if since > until:
        raise InvalidInput(f"since ({since}) is after until ({until})", param="since")
    if (until - since).days > 3660:
        raise InvalidInput("since: the range is longer than ten years", param="since")
    return since, until


def cost_query(viewer: Viewer, scope: uuid.UUID | None, params: dict[str, list[str]]) -> CostQuery:
    """The `GET /v1/costs` query of these parameters for this viewer (the admin's tenant as `tenant_id`)."""
    if viewer.admin and scope is not None:
        params = {**params, "tenant_id": [str(scope)]}
    return parse_cost_query(params, tenant_scope=None if viewer.admin else viewer.tenant_id)


def _days(since: date, until: date) -> list[date]:
    return [since + timedelta(days=n) for n in range((until - since).days + 1)]


def _range_context(since: date, until: date) -> dict[str, Any]:
    return {"since": since.isoformat(), "until": until.isoformat()}


# --- overview -------------------------------------------------------------------------------------------

def overview(session: Session, req: PageRequest) -> dict[str, Any]:
    since, until = date_range(req.params)
    query = cost_query(req.viewer, req.scope, {"since": [since.isoformat()], "until": [until.isoformat()],
                                               "group_by": ["day"]})
    by_day = run_cost_query(session, query)
    by_mode = run_cost_query(session, replace(query, group_by=("mode",)))
    figures = {row.dims["day"]: row.figures for row in by_day.rows}
    days = _days(since, until)
    labels = [d.isoformat() for d in days]

    def series(name: str) -> list[float]:
        return [amount(getattr(figures[d], name)) if d in figures else 0.0 for d in labels]

    modes = {row.dims["mode"]: row.figures for row in by_mode.rows}
    mode_rows = [(mode, modes.get(mode, Figures())) for mode in MODES]  # every mode, none hidden for being 0
    charts = [
        chart("chart-daily", "bar", labels, [dataset("spend", series("cost_usd")),
                                             dataset("baseline (all on the complex model)",
                                                     series("baseline_cost_usd"), kind="line"),
                                             dataset("savings", series("savings_usd"), kind="line")],
              title="Spend, baseline and savings per day (USD)", money=True),
        chart("chart-modes", "bar", [m for m, _ in mode_rows],
              [dataset("spend", [amount(f.cost_usd) for _, f in mode_rows]),
               dataset("baseline", [amount(f.baseline_cost_usd) for _, f in mode_rows]),
               dataset("savings", [amount(f.savings_usd) for _, f in mode_rows])],
              title="By mode (USD)", money=True),
    ]
    return {**_range_context(since, until), "totals": by_day.totals, "mode_rows": mode_rows, "charts": charts}


# --- costs explorer ------------------------------------------------------------------------------------

EXPLORER_PARAMS = ("group_by", "since", "until", "task_type", "job_id", "mode")


def _explorer_query(viewer: Viewer, scope: uuid.UUID | None, params: QueryParams, *, limit: int
                    ) -> tuple[CostQuery, date, date, list[str]]:
    unknown = [name for name in params if name not in (*EXPLORER_PARAMS, "tenant")]
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown query parameter", param=unknown[0])
    since, until = date_range(params)
    group_by = [part for value in params.getlist("group_by") for part in value.split(",") if part.strip()] or ["day"]
    given: dict[str, list[str]] = {"group_by": group_by, "since": [since.isoformat()], "until": [until.isoformat()],
                                   "limit": [str(limit)]}
    for name in ("task_type", "job_id", "mode"):
        value = params.get(name, "").strip()
        if value:
            given[name] = [value]
    return cost_query(viewer, scope, given), since, until, group_by


def _row_label(dims: dict[str, Any], group_by: Iterable[str]) -> str:
    parts = []
    for name in group_by:
        value = (dims.get("tenant_name") or dims.get(name)) if name == "tenant" else dims.get(name)
        parts.append("—" if value is None else str(value))
    return " · ".join(parts)


def costs(session: Session, req: PageRequest) -> dict[str, Any]:
    query, since, until, group_by = _explorer_query(req.viewer, req.scope, req.params, limit=1000)
    result: CostResult = run_cost_query(session, query)
    rows = [(_row_label(row.dims, query.group_by), row) for row in result.rows]
    shown = rows[:CHART_BARS]
    charts = [chart("chart-costs", "bar", [label for label, _ in shown],
                    [dataset("spend", [amount(r.figures.cost_usd) for _, r in shown]),
                     dataset("savings", [amount(r.figures.savings_usd) for _, r in shown])],
                    title=f"Spend and savings by {', '.join(query.group_by)} (USD)", money=True)]
    dimensions = [d for d in DIMENSIONS if d != "tenant" or req.viewer.admin]
    filters = {name: req.params.get(name, "") for name in ("task_type", "job_id", "mode")}
    csv_query = str(req.params) if req.params else ""
    return {**_range_context(since, until), "rows": rows, "result": result, "group_by": query.group_by,
            "dimensions": dimensions, "chosen": set(group_by), "filters": filters, "modes": MODES,
            "csv_href": "/dashboard/costs.csv" + (f"?{csv_query}" if csv_query else ""), "charts": charts}


def cost_table(session: Session, viewer: Viewer, scope: uuid.UUID | None, params: QueryParams
               ) -> tuple[list[str], list[list[Any]]]:
    """The explorer's rows as a CSV table: the dimensions (tenant with its name), then every figure."""
    query, _, _, _ = _explorer_query(viewer, scope, params, limit=100_000)
    result = run_cost_query(session, query)
    dims = [OUTPUT_KEYS.get(d, d) for d in query.group_by]
    if "tenant" in query.group_by:
        dims.append("tenant_name")
    header = [*dims, *METRICS, "savings_pct"]
    table = []
    for row in result.rows:
        body = figures_body(row.figures)
        values = {OUTPUT_KEYS.get(k, k): v for k, v in row.dims.items()}
        table.append([*(values.get(d) for d in dims), *(body[m] for m in METRICS), body["savings_pct"]])
    return header, table


# --- jobs and tasks --------------------------------------------------------------------------------------

def _done(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status in TERMINAL)


def jobs(session: Session, req: PageRequest) -> dict[str, Any]:
    page = list_jobs_in(session, req.scope, limit=PAGE_ROWS)
    summaries = summarize_jobs(session, [j.id for j in page])
    rows = [{"job": j, "summary": summaries[j.id], "done": _done(summaries[j.id].counts),
             "tenant": req.tenant_names.get(j.tenant_id, str(j.tenant_id))} for j in page]
    return {"rows": rows}


def job(session: Session, req: PageRequest, job_id: uuid.UUID) -> dict[str, Any]:
    found = find_job(session, req.scope, job_id)
    summary = summarize_jobs(session, [found.id])[found.id]
    tasks = job_tasks(session, found.id, limit=PAGE_ROWS)
    statuses = list(summary.counts)
    charts = [chart("chart-job", "doughnut", statuses, [dataset("tasks", [summary.counts[s] for s in statuses])],
                    title="Tasks by status")]
    return {"job": found, "summary": summary, "done": _done(summary.counts), "tasks": tasks,
            "tenant": req.tenant_names.get(found.tenant_id, str(found.tenant_id)), "charts": charts}


def task(session: Session, req: PageRequest, task_id: uuid.UUID) -> dict[str, Any]:
    found = find_task(session, req.scope, task_id)
    body = task_body(found)
    return {"task": found, "fields": [(k, v) for k, v in body.items() if k not in ("output", "response")],
            "ledger": task_ledger(session, found),
            "tenant": req.tenant_names.get(found.tenant_id, str(found.tenant_id))}


# --- provider batches ------------------------------------------------------------------------------------

TIMELINE_BARS = 30
PHASES = (("waiting to be sent", "created_at", "submitted_at"),
          ("at the provider", "submitted_at", "completed_at"),
          ("ingesting", "completed_at", "ingested_at"))


def _seconds(start: datetime, moment: datetime) -> float:
    return round((moment - start).total_seconds(), 3)


def timeline(views: list[ProviderBatchView]) -> dict[str, Any]:
    """Floating bars per batch: created → submitted → completed → ingested, in seconds after the first
    batch shown was created (a phase not reached yet is left out)."""
    shown = sorted(views[:TIMELINE_BARS], key=lambda v: v.created_at)
    origin = shown[0].created_at if shown else datetime.now(UTC)
    datasets = []
    for label, start_field, end_field in PHASES:
        data: list[list[float] | None] = []
        for view in shown:
            start, end = getattr(view, start_field), getattr(view, end_field)
            data.append([_seconds(origin, start), _seconds(origin, end)] if start and end else None)
        datasets.append(dataset(label, data))
    return chart("chart-batches", "timeline", [str(v.id)[:8] for v in shown], datasets,
                 title=f"Batch timeline (seconds after {origin:%Y-%m-%d %H:%M:%S} UTC)", axis_title="seconds")


def batches(session: Session, req: PageRequest) -> dict[str, Any]:
    views, _ = list_provider_batches(session, tenant_id=req.scope, limit=PAGE_ROWS)
    live = [v for v in views if v.status not in (BatchStatus.DONE, BatchStatus.FAILED)]
    done = [v for v in views if v.status in (BatchStatus.DONE, BatchStatus.FAILED)]
    return {"live": live, "done": done, "charts": [timeline(views)]}


# --- quality --------------------------------------------------------------------------------------------

def quality(session: Session, req: PageRequest) -> dict[str, Any]:
    since, until = date_range(req.params)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    end = datetime(until.year, until.month, until.day, tzinfo=UTC) + timedelta(days=1)
    daily = agreement_by_day(session, req.scope, since=start, until=end)
    labels = [d.isoformat() for d in _days(since, until)]
    task_types = sorted({row.task_type for row in daily})
    rate = {(row.day.isoformat(), row.task_type): row.rate * 100 for row in daily}
    datasets = [dataset(t, [rate.get((d, t)) for d in labels]) for t in task_types]
    charts = [chart("chart-agreement", "line", labels, datasets, title="Agreement of light with complex (%)",
                    percent=True)]
    rules = rules_in(session, req.scope)
    return {**_range_context(since, until), "charts": charts, "daily": daily, "rules": rules,
            "events": events_in(session, req.scope, limit=PAGE_ROWS), "tiers": [t.value for t in Tier],
            "can_change": not req.viewer.admin, "names": req.tenant_names}


# --- schedules ---------------------------------------------------------------------------------------------

def schedules(session: Session, req: PageRequest) -> dict[str, Any]:
    found = list_schedules_in(session, req.scope, limit=PAGE_ROWS)
    runs = recent_runs(session, [s.id for s in found], per_schedule=5)
    return {"rows": [{"schedule": s, "runs": runs[s.id], "tenant": req.tenant_names.get(s.tenant_id, "")}
                     for s in found]}


# --- budgets and rate limits -----------------------------------------------------------------------------

def limits(session: Session, req: PageRequest) -> dict[str, Any]:
    if req.scope is not None:
        tenant = session.get(Tenant, req.scope)
        tenants = [tenant] if tenant is not None else []
    else:
        tenants = list_tenants(session)
    rows: list[dict[str, Any]] = []
    for tenant in tenants:
        budget = tenant.monthly_budget_usd
        status = budget_status(session, tenant.id, budget if budget is not None else Decimal(0))
        rows.append({"tenant": tenant, "status": status, "budget": budget,
                     "remaining": max(budget - status.committed, Decimal(0)) if budget is not None else None,
                     "reached": status.reached if budget is not None else False})
    shown = rows[:CHART_BARS]
    charts = [chart("chart-budget", "bar", [r["tenant"].name for r in shown],
                    [dataset("spent this month", [amount(r["status"].spent) for r in shown]),
                     dataset("monthly budget", [amount(r["budget"]) if r["budget"] is not None else None
                                                for r in shown])],
                    title="Spend this month against the budget (USD)", money=True)]
    limits_config = req.ctx.config.limits
    return {"rows": rows, "policy": req.ctx.config.budget.policy, "charts": charts,
            "failed_auth_per_minute": limits_config.failed_auth_per_minute, "counts": COUNTS}
