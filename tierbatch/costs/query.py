"""Cost queries, the token report and monthly budgets.

Where the figures come from
---------------------------
Every ledger row is summed into `ledger_daily` (one row per UTC day and tenant, job, task type, tier,
mode, provider and served model) by a statement-level trigger in the transaction that writes the row
(migration 0002). A query is split into time segments: whole UTC days are read from `ledger_daily`,
the partial days at either end from the `cost_ledger` view (ledger rows, found through the
`(tenant_id, created_at)` index or the BRIN index on `created_at`). Grouping by `hour` reads the ledger
rows of the whole range. The two sources count the same way (a test holds them equal):

- `requests`: ledger rows (provider responses and cache hits); `unpriced_requests`: rows without a price;
- tokens: `input_tokens` includes `cached_tokens`; `output_tokens` includes `reasoning_tokens`;
- `input_cost_usd` (uncached input), `cached_input_cost_usd`, `output_cost_usd`: the parts of `cost_usd`;
  `reasoning_cost_usd` is the share of `output_cost_usd` spent on reasoning tokens (not added again);
- `cost_usd`: all spend, shadow calls included; a cache hit costs 0; unpriced rows add nothing;
- `shadow_cost_usd`: the part of `cost_usd` spent by the quality monitor's shadow calls;
- `baseline_cost_usd`: what the non-shadow rows would have cost on the complex model, immediate price;
- `savings_usd`: baseline − cost over non-shadow, priced rows (shadow calls are spend, not savings);
- `savings_pct`: savings / (baseline of the same rows) × 100.

No query parameter reaches SQL as text: dimensions come from a fixed table of expressions, and
filter values are bound parameters.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import Date, DateTime, Select, Text, and_, cast, column, func, null, select, table, union_all
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from tierbatch.base.errors import InvalidInput
from tierbatch.base.states import Mode
from tierbatch.db.models import LedgerDaily, Tenant

DIMENSIONS = ("day", "hour", "model", "provider", "tier", "task_type", "mode", "job", "tenant")
COUNTS = ("requests", "unpriced_requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")
MONEY = ("input_cost_usd", "cached_input_cost_usd", "output_cost_usd", "reasoning_cost_usd", "cost_usd",
         "shadow_cost_usd", "baseline_cost_usd", "savings_usd")
METRICS = COUNTS + MONEY
MAX_ROWS = 100_000
DEFAULT_ROWS = 10_000

# The analyst view over ledger rows (migration 0002): per-row figures that add up like ledger_daily.
cost_ledger = table(
    "cost_ledger",
    column("created_at", DateTime(timezone=True)), column("day", Date), column("hour", DateTime(timezone=True)),
    column("tenant_id"), column("job_id"), column("task_type", Text), column("tier", Text), column("mode", Text),
    column("provider", Text), column("served_model", Text), column("unpriced"),
    *(column(name) for name in METRICS if name not in ("requests", "unpriced_requests")),
)


# --- parameters -----------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d{1,6})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_instant(value: str, param: str, now: datetime, *, end: bool = False) -> datetime:
    """RFC 3339 (no offset: UTC), a date (UTC midnight; for an end bound the whole day is included),
    or a duration back from now: `30m`, `24h`, `7d`, `2w`."""
    text = value.strip()
    relative = _RELATIVE.match(text)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    if _DATE.match(text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise InvalidInput(f"{param}: {value!r} is not a valid date", param=param) from None
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start + timedelta(days=1) if end else start
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{param}: {value!r} is not an RFC 3339 timestamp, a date (YYYY-MM-DD) or a duration "
                           "such as 24h or 7d", param=param) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_group_by(values: Iterable[str], *, admin: bool) -> tuple[str, ...]:
    dims: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            if name not in DIMENSIONS:
                raise InvalidInput(f"group_by: unknown dimension {name!r}; use any of {', '.join(DIMENSIONS)}",
                                   param="group_by")
            if name == "tenant" and not admin:
                raise InvalidInput("group_by: 'tenant' needs the admin token", param="group_by")
            if name in dims:
                raise InvalidInput(f"group_by: {name!r} is given twice", param="group_by")
            dims.append(name)
    return tuple(dims)


def _uuid_param(value: str, param: str) -> uuid.UUID:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise InvalidInput(f"{param}: {value!r} is not an id", param=param) from None


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput(f"{name}: give it once", param=name)
    return values[0]


@dataclass(frozen=True, slots=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None  # exclusive
    tenant_id: uuid.UUID | None = None
    task_type: str | None = None
    job_id: uuid.UUID | None = None
    mode: Mode | None = None


@dataclass(frozen=True, slots=True)
class CostQuery:
    group_by: tuple[str, ...] = ()
    filters: Filters = field(default_factory=Filters)
    limit: int = DEFAULT_ROWS


_COMMON_PARAMS = ("since", "until", "task_type", "job_id", "mode", "tenant_id")


def parse_filters(params: Mapping[str, Sequence[str]], *, tenant_scope: uuid.UUID | None,
                   now: datetime) -> Filters:
    since_text, until_text = _single(params, "since"), _single(params, "until")
    since = parse_instant(since_text, "since", now) if since_text else None
    until = parse_instant(until_text, "until", now, end=True) if until_text else None
    if since is not None and until is not None and since > until:
        raise InvalidInput(f"since ({since.isoformat()}) is after until ({until.isoformat()})", param="since")
    tenant_text = _single(params, "tenant_id")
    if tenant_text is not None and tenant_scope is not None:
        raise InvalidInput("tenant_id: only the admin token may choose a tenant", param="tenant_id")
    tenant_id = _uuid_param(tenant_text, "tenant_id") if tenant_text else tenant_scope
    job_text = _single(params, "job_id")
    mode_text = _single(params, "mode")
    mode = None
    if mode_text:
        try:
            mode = Mode(mode_text.strip())
        except ValueError:
            raise InvalidInput(f"mode: {mode_text!r} is not one of {', '.join(m.value for m in Mode)}",
                               param="mode") from None
    task_type = _single(params, "task_type")
    return Filters(since=since, until=until, tenant_id=tenant_id, task_type=task_type or None,
                   job_id=_uuid_param(job_text, "job_id") if job_text else None, mode=mode)


def refuse_unknown(params: Mapping[str, Sequence[str]], allowed: Iterable[str]) -> None:
    known = set(allowed)
    for name in params:
        if name not in known:
            raise InvalidInput(f"{name}: unknown query parameter; use any of {', '.join(sorted(known))}",
                               param=name)


def int_param(params: Mapping[str, Sequence[str]], name: str, default: int, low: int, high: int) -> int:
    text = _single(params, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"{name}: {text!r} is not a whole number", param=name) from None
    if not low <= value <= high:
        raise InvalidInput(f"{name}: must be between {low} and {high}", param=name)
    return value


def parse_cost_query(params: Mapping[str, Sequence[str]], *, tenant_scope: uuid.UUID | None,
                     now: datetime | None = None) -> CostQuery:
    """`GET /v1/costs` parameters → a CostQuery; `tenant_scope` None means the admin (all tenants)."""
    refuse_unknown(params, ("group_by", "limit", *_COMMON_PARAMS))
    now = now or datetime.now(UTC)
    group_by = parse_group_by(params.get("group_by", ()), admin=tenant_scope is None)
    filters = parse_filters(params, tenant_scope=tenant_scope, now=now)
    return CostQuery(group_by, filters, int_param(params, "limit", DEFAULT_ROWS, 1, MAX_ROWS))


# --- the query --------------------------------------------------------------------------------------

def _floor_day(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def _ceil_day(moment: datetime) -> datetime:
    floor = _floor_day(moment)
    return floor if floor == moment else floor + timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the time range and where it is read: `daily` (whole UTC days) or `ledger` rows."""

    source: str
    start: datetime | None
    end: datetime | None


def plan_segments(since: datetime | None, until: datetime | None, *, hourly: bool) -> list[Segment]:
    if hourly:
        return [Segment("ledger", since, until)]
    first_day = _ceil_day(since) if since is not None else None
    last_day = _floor_day(until) if until is not None else None
    if first_day is not None and last_day is not None and first_day > last_day:
        return [Segment("ledger", since, until)]  # within one UTC day
    segments = []
    if since is not None and first_day is not None and since < first_day:
        segments.append(Segment("ledger", since, first_day))
    if first_day is None or last_day is None or first_day < last_day:
        segments.append(Segment("daily", first_day, last_day))
    if until is not None and last_day is not None and last_day < until:
        segments.append(Segment("ledger", last_day, until))
    return segments or [Segment("ledger", since, until)]  # an empty range


def _dimension(name: str, source: str) -> ColumnElement[Any]:
    """The SQL expression of a whitelisted dimension in a source (never built from user text)."""
    if source == "daily":
        d = LedgerDaily
        daily: dict[str, Any] = {
            "day": d.day, "hour": cast(null(), DateTime(timezone=True)), "model": d.served_model,
            "provider": d.provider, "tier": cast(d.tier, Text), "task_type": d.task_type,
            "mode": cast(d.mode, Text), "job": d.job_id, "tenant": d.tenant_id,
        }
        return daily[name]
    c = cost_ledger.c
    ledger: dict[str, Any] = {
        "day": c.day, "hour": c.hour, "model": c.served_model, "provider": c.provider, "tier": c.tier,
        "task_type": c.task_type, "mode": c.mode, "job": c.job_id, "tenant": c.tenant_id,
    }
    return ledger[name]


def _sums(source: str) -> list[ColumnElement[Any]]:
    if source == "daily":
        return [func.sum(getattr(LedgerDaily, name)).label(name) for name in METRICS]
    c = cost_ledger.c
    out: list[ColumnElement[Any]] = [func.count().label("requests"),
                                     func.count().filter(c.unpriced).label("unpriced_requests")]
    out += [func.sum(getattr(c, name)).label(name) for name in COUNTS[2:]]
    out += [func.coalesce(func.sum(getattr(c, name)), 0).label(name) for name in MONEY]
    return out


def _segment_select(segment: Segment, dims: Sequence[str], filters: Filters) -> Select[Any]:
    source = segment.source
    where: list[ColumnElement[bool]] = []
    if source == "daily":
        d = LedgerDaily
        if segment.start is not None:
            where.append(d.day >= segment.start.date())
        if segment.end is not None:
            where.append(d.day < segment.end.date())
        where += _filter_clauses(d.tenant_id, d.task_type, d.job_id, d.mode, filters, enum_mode=True)
        from_clause: Any = LedgerDaily.__table__
    else:
        c = cost_ledger.c
        if segment.start is not None:
            where.append(c.created_at >= segment.start)
        if segment.end is not None:
            where.append(c.created_at < segment.end)
        where += _filter_clauses(c.tenant_id, c.task_type, c.job_id, c.mode, filters, enum_mode=False)
        from_clause = cost_ledger
    dim_exprs = [_dimension(n, source) for n in dims]
    statement = select(*[e.label(n) for e, n in zip(dim_exprs, dims, strict=True)], *_sums(source))
    statement = statement.select_from(from_clause)
    if where:
        statement = statement.where(and_(*where))
    if dims:
        statement = statement.group_by(*dim_exprs)
    return statement


def _filter_clauses(tenant: Any, task_type: Any, job: Any, mode: Any, filters: Filters, *,
                    enum_mode: bool) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if filters.tenant_id is not None:
        clauses.append(tenant == filters.tenant_id)
    if filters.task_type is not None:
        clauses.append(task_type == filters.task_type)
    if filters.job_id is not None:
        clauses.append(job == filters.job_id)
    if filters.mode is not None:
        clauses.append(mode == (filters.mode if enum_mode else filters.mode.value))
    return clauses


def build_statement(dims: Sequence[str], filters: Filters, *, use_rollup: bool = True,
                    limit: int | None = None) -> Select[Any]:
    """One SELECT over the segments of the range, grouped by `dims` (whitelisted names)."""
    for name in dims:
        if name not in DIMENSIONS:  # parse_group_by already refused it; never build SQL from it
            raise ValueError(name)
    if use_rollup:
        segments = plan_segments(filters.since, filters.until, hourly="hour" in dims)
    else:
        segments = [Segment("ledger", filters.since, filters.until)]
    parts = [_segment_select(s, dims, filters) for s in segments]
    union = union_all(*parts).subquery("segments")
    statement = select(*[union.c[n] for n in dims], *[func.sum(union.c[m]).label(m) for m in METRICS])
    if dims:
        statement = statement.group_by(*[union.c[n] for n in dims]).order_by(*[union.c[n] for n in dims])
    if limit is not None:
        statement = statement.limit(limit)
    return statement


@dataclass(frozen=True, slots=True)
class Figures:
    requests: int = 0
    unpriced_requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    input_cost_usd: Decimal = Decimal(0)
    cached_input_cost_usd: Decimal = Decimal(0)
    output_cost_usd: Decimal = Decimal(0)
    reasoning_cost_usd: Decimal = Decimal(0)
    cost_usd: Decimal = Decimal(0)
    shadow_cost_usd: Decimal = Decimal(0)
    baseline_cost_usd: Decimal = Decimal(0)
    savings_usd: Decimal = Decimal(0)

    @classmethod
    def from_row(cls, row: Any) -> Figures:
        values: dict[str, Any] = {}
        for name in COUNTS:
            values[name] = int(row[name] or 0)
        for name in MONEY:
            values[name] = Decimal(row[name] or 0)
        return cls(**values)

    def __add__(self, other: Figures) -> Figures:
        return Figures(**{name: getattr(self, name) + getattr(other, name) for name in METRICS})

    @property
    def savings_pct(self) -> Decimal | None:
        """Savings over the baseline of the rows they were measured on (priced, non-shadow)."""
        measured = self.savings_usd + self.cost_usd - self.shadow_cost_usd
        if measured <= 0:
            return None
        return (self.savings_usd * 100 / measured).quantize(Decimal("0.01"), ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class CostRow:
    dims: dict[str, Any]
    figures: Figures


@dataclass(frozen=True, slots=True)
class CostResult:
    group_by: tuple[str, ...]
    rows: list[CostRow]
    totals: Figures
    truncated: bool
    filters: Filters


def _dim_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "day":
        return value.isoformat()
    if name == "hour":
        return value.astimezone(UTC).isoformat()
    if name in ("job", "tenant"):
        return str(value)
    return value


def run_cost_query(session: Session, query: CostQuery, *, use_rollup: bool = True) -> CostResult:
    dims = query.group_by
    statement = build_statement(dims, query.filters, use_rollup=use_rollup,
                                limit=query.limit + 1 if dims else None)
    fetched = [row._mapping for row in session.execute(statement)]
    truncated = len(fetched) > query.limit
    fetched = fetched[:query.limit]
    rows = [CostRow({n: _dim_value(n, r[n]) for n in dims}, Figures.from_row(r))
            for r in fetched if r["requests"]]
    if truncated:
        total_row = session.execute(build_statement((), query.filters, use_rollup=use_rollup)).one()._mapping
        totals = Figures.from_row(total_row)
    else:
        totals = sum((r.figures for r in rows), Figures())
    if "tenant" in dims and rows:
        ids = {uuid.UUID(r.dims["tenant"]) for r in rows}
        found = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids)))
        names = {row.id: row.name for row in found}
        for row in rows:
            row.dims["tenant_name"] = names.get(uuid.UUID(row.dims["tenant"]))
    return CostResult(dims, rows, totals, truncated, query.filters)


def figures_body(figures: Figures) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(figures, name) for name in COUNTS}
    for name in MONEY:
        body[name] = money_text(getattr(figures, name))
    pct = figures.savings_pct
    body["savings_pct"] = float(pct) if pct is not None else None
    return body


def money_text(value: Decimal | None) -> str | None:
    if value is None:
        return None
    return format(value.normalize(), "f")


OUTPUT_KEYS = {"job": "job_id", "tenant": "tenant_id"}  # dimension → its key in an answer row


def result_body(result: CostResult) -> dict[str, Any]:
    """The JSON answer of `GET /v1/costs`: money as decimal strings."""
    f = result.filters
    return {
        "object": "cost_report", "group_by": list(result.group_by),
        "since": f.since.isoformat() if f.since else None, "until": f.until.isoformat() if f.until else None,
        "rows": [{**{OUTPUT_KEYS.get(k, k): v for k, v in row.dims.items()}, **figures_body(row.figures)}
                 for row in result.rows],
        "totals": figures_body(result.totals), "truncated": result.truncated,
    }
