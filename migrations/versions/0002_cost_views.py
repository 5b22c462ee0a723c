"""cost views and the daily ledger rollup trigger

Hand-written. The table `ledger_daily` itself comes from the models (0001); this revision adds:

- `ledger_daily_apply()` and its statement-level triggers on `ledger_entries` (INSERT, UPDATE, DELETE,
  each with transition tables, plus TRUNCATE): every statement that writes ledger rows adds its sums to
  `ledger_daily` in the same transaction, one upsert per statement (not per row), keys locked in sorted
  order so concurrent writers cannot deadlock on it;
- a backfill of `ledger_daily` from the rows already in the ledger;
- the analyst views: `cost_ledger` (one row per ledger row, with tenant and job names and the
  per-row figures the aggregates add up), `cost_daily` (the rollup with names), `cost_by_day`,
  `cost_by_model`, `cost_by_task_type`.

The per-row rules live here twice, side by side: in `cost_ledger` and in the trigger's sums. A cache hit
costs 0 (its part costs are 0 too, whatever prices its row keeps); a shadow call is spend with no
baseline and no savings; `reasoning_cost_usd` is the part of `output_cost_usd` spent on reasoning tokens;
unpriced rows add to `unpriced_requests` and to no money column.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = ("tenant_id", "day", "task_type", "tier", "mode", "provider", "served_model", "job_id")

# (column, aggregate over ledger rows `r`); the same sums as `cost_ledger` columns added up
SUMS = (
    ("requests", "count(*)"),
    ("unpriced_requests", "count(*) FILTER (WHERE r.unpriced)"),
    ("input_tokens", "sum(r.input_tokens)"),
    ("cached_tokens", "sum(r.cached_tokens)"),
    ("output_tokens", "sum(r.output_tokens)"),
    ("reasoning_tokens", "sum(r.reasoning_tokens)"),
    ("input_cost_usd", "coalesce(sum(r.input_cost_usd) FILTER (WHERE r.mode <> 'cache'), 0)"),
    ("cached_input_cost_usd", "coalesce(sum(r.cached_input_cost_usd) FILTER (WHERE r.mode <> 'cache'), 0)"),
    ("output_cost_usd", "coalesce(sum(r.output_cost_usd) FILTER (WHERE r.mode <> 'cache'), 0)"),
    ("reasoning_cost_usd",
     "coalesce(sum(round(r.reasoning_tokens * r.output_price / 1000000, 10)) FILTER (WHERE r.mode <> 'cache'), 0)"),
    ("cost_usd", "coalesce(sum(r.cost_usd), 0)"),
    ("shadow_cost_usd", "coalesce(sum(r.cost_usd) FILTER (WHERE r.mode = 'shadow'), 0)"),
    ("baseline_cost_usd", "coalesce(sum(r.baseline_cost_usd) FILTER (WHERE r.mode <> 'shadow'), 0)"),
    ("savings_usd", "coalesce(sum(r.baseline_cost_usd - r.cost_usd) FILTER (WHERE r.mode <> 'shadow'), 0)"),
)

_DAY = "(r.created_at AT TIME ZONE 'UTC')::date"


def _upsert(source: str, sign: str) -> str:
    """Add (sign '+') or take away (sign '-') the sums of the ledger rows in `source`."""
    keys = ", ".join(KEY)
    key_exprs = ", ".join(_DAY if k == "day" else f"r.{k}" for k in KEY)
    columns = ", ".join(name for name, _ in SUMS)
    sums = ", ".join(f"{sign}{expr}" if sign == "-" else expr for _, expr in SUMS)
    positions = ", ".join(str(i + 1) for i in range(len(KEY)))
    updates = ", ".join(f"{name} = d.{name} + EXCLUDED.{name}" for name, _ in SUMS)
    return (f"INSERT INTO ledger_daily AS d ({keys}, {columns}) "
            f"SELECT {key_exprs}, {sums} FROM {source} AS r "
            f"GROUP BY {positions} ORDER BY {positions} "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates};")


APPLY_FUNCTION = f"""
CREATE FUNCTION ledger_daily_apply() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_upsert("old_rows", "-")}
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        {_upsert("new_rows", "+")}
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM ledger_daily AS d
        USING (SELECT DISTINCT r.tenant_id, {_DAY} AS day FROM old_rows AS r) AS k
        WHERE d.tenant_id = k.tenant_id AND d.day = k.day AND d.requests = 0;
    END IF;
    RETURN NULL;
END
$fn$;
"""

TRUNCATE_FUNCTION = """
CREATE FUNCTION ledger_daily_truncate() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    TRUNCATE ledger_daily;
    RETURN NULL;
END
$fn$;
"""

TRIGGERS = (
    "CREATE TRIGGER ledger_daily_insert AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_daily_apply();",
    "CREATE TRIGGER ledger_daily_update AFTER UPDATE ON ledger_entries "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_daily_apply();",
    "CREATE TRIGGER ledger_daily_delete AFTER DELETE ON ledger_entries REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_daily_apply();",
    "CREATE TRIGGER ledger_daily_truncate AFTER TRUNCATE ON ledger_entries "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_daily_truncate();",
)

BACKFILL = "TRUNCATE ledger_daily;\n" + _upsert("ledger_entries", "+")

COST_LEDGER = """
CREATE VIEW cost_ledger AS
SELECT
    l.id,
    l.created_at,
    (l.created_at AT TIME ZONE 'UTC')::date AS day,
    date_trunc('hour', l.created_at, 'UTC') AS hour,
    l.tenant_id,
    t.name AS tenant_name,
    l.job_id,
    j.name AS job_name,
    l.task_id,
    l.batch_id,
    l.task_type,
    l.tier::text AS tier,
    l.mode::text AS mode,
    l.provider,
    l.requested_model,
    l.served_model,
    l.input_tokens,
    l.cached_tokens,
    l.input_tokens - l.cached_tokens AS uncached_input_tokens,
    l.output_tokens,
    l.reasoning_tokens,
    l.input_price,
    l.cached_input_price,
    l.output_price,
    CASE WHEN l.mode = 'cache' THEN 0 ELSE l.input_cost_usd END AS input_cost_usd,
    CASE WHEN l.mode = 'cache' THEN 0 ELSE l.cached_input_cost_usd END AS cached_input_cost_usd,
    CASE WHEN l.mode = 'cache' THEN 0 ELSE l.output_cost_usd END AS output_cost_usd,
    CASE WHEN l.mode = 'cache' THEN 0 ELSE round(l.reasoning_tokens * l.output_price / 1000000, 10) END
        AS reasoning_cost_usd,
    l.cost_usd,
    CASE WHEN l.mode = 'shadow' THEN l.cost_usd ELSE 0 END AS shadow_cost_usd,
    CASE WHEN l.mode = 'shadow' THEN NULL ELSE l.baseline_cost_usd END AS baseline_cost_usd,
    CASE WHEN l.mode = 'shadow' THEN NULL ELSE l.baseline_cost_usd - l.cost_usd END AS savings_usd,
    l.unpriced,
    l.latency_ms
FROM ledger_entries AS l
LEFT JOIN tenants AS t ON t.id = l.tenant_id
LEFT JOIN jobs AS j ON j.id = l.job_id;
"""

_MONEY = ("input_cost_usd", "cached_input_cost_usd", "output_cost_usd", "reasoning_cost_usd", "cost_usd",
          "shadow_cost_usd", "baseline_cost_usd", "savings_usd")


def _grouped_view(name: str, dims: Sequence[str]) -> str:
    """A view of `cost_daily` summed per (day, tenant, dims…), with savings_pct."""
    sums = ",\n    ".join(f"sum({c})::numeric(20, 10) AS {c}" if c in _MONEY else f"sum({c})::bigint AS {c}"
                          for c, _ in SUMS)
    group = ", ".join(("day", "tenant_id", "tenant_name", *dims))
    return f"""
CREATE VIEW {name} AS
SELECT
    {group},
    {sums},
    round(100 * sum(savings_usd) / nullif(sum(savings_usd) + sum(cost_usd) - sum(shadow_cost_usd), 0), 2)
        AS savings_pct
FROM cost_daily
GROUP BY {group};
"""


COST_DAILY = """
CREATE VIEW cost_daily AS
SELECT
    d.day,
    d.tenant_id,
    t.name AS tenant_name,
    d.job_id,
    j.name AS job_name,
    d.task_type,
    d.tier::text AS tier,
    d.mode::text AS mode,
    d.provider,
    d.served_model,
    d.requests,
    d.unpriced_requests,
    d.input_tokens,
    d.cached_tokens,
    d.output_tokens,
    d.reasoning_tokens,
    d.input_cost_usd,
    d.cached_input_cost_usd,
    d.output_cost_usd,
    d.reasoning_cost_usd,
    d.cost_usd,
    d.shadow_cost_usd,
    d.baseline_cost_usd,
    d.savings_usd
FROM ledger_daily AS d
LEFT JOIN tenants AS t ON t.id = d.tenant_id
LEFT JOIN jobs AS j ON j.id = d.job_id;
"""

VIEWS = (
    ("cost_ledger", COST_LEDGER),
    ("cost_daily", COST_DAILY),
    ("cost_by_day", _grouped_view("cost_by_day", ())),
    ("cost_by_model", _grouped_view("cost_by_model", ("provider", "served_model"))),
    ("cost_by_task_type", _grouped_view("cost_by_task_type", ("task_type",))),
)


def upgrade() -> None:
    op.execute(APPLY_FUNCTION)
    op.execute(TRUNCATE_FUNCTION)
    for statement in TRIGGERS:
        op.execute(statement)
    op.execute(BACKFILL)
    for _, statement in VIEWS:
        op.execute(statement)


def downgrade() -> None:
    for name, _ in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for trigger in ("ledger_daily_truncate", "ledger_daily_delete", "ledger_daily_update", "ledger_daily_insert"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON ledger_entries")
    op.execute("DROP FUNCTION IF EXISTS ledger_daily_truncate()")
    op.execute("DROP FUNCTION IF EXISTS ledger_daily_apply()")
    op.execute("TRUNCATE ledger_daily")
