"""ledger: cache writes priced at their own rate, and the batch discount a row's prices were derived with

`ledger_entries` gains `cache_write_tokens` (a part of `input_tokens`, like `cached_tokens`; the CHECK
now bounds both together), `cache_write_price`, `cache_write_cost_usd`, and `batch_discount` (the
provider's discount applied to the standard price of a model whose price table has no batch price of its
own; NULL otherwise). `ledger_daily` gains `cache_write_tokens` and `cache_write_cost_usd`, summed by
`ledger_daily_apply()` like the other kinds. Rows already written keep `cache_write_tokens = 0` and NULL
cache-write price and cost (nothing recorded them); the rollup's new sums start at 0 for the same reason.

The views get the new columns at their end (`CREATE OR REPLACE VIEW` keeps every existing column, so
queries over them do not change); `cost_ledger.uncached_input_tokens` is now what is billed at
`input_price`: the input tokens less cache reads and cache writes (the same figure on every row written
before). Frozen copies of 0002's definitions: the downgrade puts those back.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(20, 10)
TOKEN_CHECK = 'ck_ledger_entries_token_counts_valid'
OLD_TOKEN_RULE = ('input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0 AND reasoning_tokens >= 0 '
                  'AND cached_tokens <= input_tokens')
TOKEN_RULE = ('input_tokens >= 0 AND cached_tokens >= 0 AND cache_write_tokens >= 0 AND output_tokens >= 0 '
              'AND reasoning_tokens >= 0 AND cached_tokens + cache_write_tokens <= input_tokens')

KEY = ("tenant_id", "day", "task_type", "tier", "mode", "provider", "served_model", "job_id")

# (column, aggregate over ledger rows `r`): 0002's sums, then the cache-write ones
OLD_SUMS = (
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
NEW_SUMS = (
    ("cache_write_tokens", "sum(r.cache_write_tokens)"),
    ("cache_write_cost_usd", "coalesce(sum(r.cache_write_cost_usd) FILTER (WHERE r.mode <> 'cache'), 0)"),
)
_MONEY_SUMS = frozenset(("input_cost_usd", "cached_input_cost_usd", "output_cost_usd", "reasoning_cost_usd",
                         "cost_usd", "shadow_cost_usd", "baseline_cost_usd", "savings_usd", "cache_write_cost_usd"))

_DAY = "(r.created_at AT TIME ZONE 'UTC')::date"


def _upsert(source: str, sign: str, sums: Sequence[tuple[str, str]]) -> str:
    """Add (sign '+') or take away (sign '-') the sums of the ledger rows in `source`."""
    keys = ", ".join(KEY)
    key_exprs = ", ".join(_DAY if k == "day" else f"r.{k}" for k in KEY)
    columns = ", ".join(name for name, _ in sums)
    exprs = ", ".join(f"{sign}{expr}" if sign == "-" else expr for _, expr in sums)
    positions = ", ".join(str(i + 1) for i in range(len(KEY)))
    updates = ", ".join(f"{name} = d.{name} + EXCLUDED.{name}" for name, _ in sums)
    return (f"INSERT INTO ledger_daily AS d ({keys}, {columns}) "
            f"SELECT {key_exprs}, {exprs} FROM {source} AS r "
            f"GROUP BY {positions} ORDER BY {positions} "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates};")


def _apply_function(sums: Sequence[tuple[str, str]]) -> str:
    return f"""
CREATE OR REPLACE FUNCTION ledger_daily_apply() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_upsert("old_rows", "-", sums)}
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        {_upsert("new_rows", "+", sums)}
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


def _cost_ledger(cache_writes: bool) -> str:
    uncached = ("l.input_tokens - l.cached_tokens - l.cache_write_tokens" if cache_writes
                else "l.input_tokens - l.cached_tokens")
    added = """,
    l.cache_write_tokens,
    l.cache_write_price,
    CASE WHEN l.mode = 'cache' THEN 0 ELSE l.cache_write_cost_usd END AS cache_write_cost_usd,
    l.batch_discount""" if cache_writes else ""
    return f"""
CREATE OR REPLACE VIEW cost_ledger AS
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
    {uncached} AS uncached_input_tokens,
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
    l.latency_ms{added}
FROM ledger_entries AS l
LEFT JOIN tenants AS t ON t.id = l.tenant_id
LEFT JOIN jobs AS j ON j.id = l.job_id;
"""


def _cost_daily(sums: Sequence[tuple[str, str]]) -> str:
    columns = ",\n    ".join(f"d.{name}" for name, _ in sums)
    return f"""
CREATE OR REPLACE VIEW cost_daily AS
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
    {columns}
FROM ledger_daily AS d
LEFT JOIN tenants AS t ON t.id = d.tenant_id
LEFT JOIN jobs AS j ON j.id = d.job_id;
"""


def _grouped_view(name: str, dims: Sequence[str], added: Sequence[tuple[str, str]]) -> str:
    """A view of `cost_daily` summed per (day, tenant, dims…), with savings_pct (then the `added` sums)."""
    def summed(sums: Sequence[tuple[str, str]]) -> str:
        return "".join(f"\n    sum({c})::{'numeric(20, 10)' if c in _MONEY_SUMS else 'bigint'} AS {c},"
                       for c, _ in sums)

    group = ", ".join(("day", "tenant_id", "tenant_name", *dims))
    after = summed(added).rstrip(",")
    return f"""
CREATE OR REPLACE VIEW {name} AS
SELECT
    {group},{summed(OLD_SUMS)}
    round(100 * sum(savings_usd) / nullif(sum(savings_usd) + sum(cost_usd) - sum(shadow_cost_usd), 0), 2)
        AS savings_pct{"," if after else ""}{after}
FROM cost_daily
GROUP BY {group};
"""


GROUPED = (("cost_by_day", ()), ("cost_by_model", ("provider", "served_model")), ("cost_by_task_type", ("task_type",)))


def _views(cache_writes: bool) -> list[str]:
    added = NEW_SUMS if cache_writes else ()
    return [_cost_ledger(cache_writes), _cost_daily((*OLD_SUMS, *added)),
            *(_grouped_view(name, dims, added) for name, dims in GROUPED)]


def upgrade() -> None:
    op.add_column('ledger_entries', sa.Column('cache_write_tokens', sa.BigInteger(), server_default=sa.text('0'),
                                              nullable=False))
    op.add_column('ledger_entries', sa.Column('cache_write_price', sa.Numeric(20, 10), nullable=True))
    op.add_column('ledger_entries', sa.Column('cache_write_cost_usd', MONEY, nullable=True))
    op.add_column('ledger_entries', sa.Column('batch_discount', sa.Numeric(20, 10), nullable=True))
    op.drop_constraint(op.f(TOKEN_CHECK), 'ledger_entries', type_='check')
    op.create_check_constraint(op.f(TOKEN_CHECK), 'ledger_entries', TOKEN_RULE)
    # the rollup's sums have no default (the trigger writes every one): 0 for the days already summed
    for column, kind in (('cache_write_tokens', sa.BigInteger()), ('cache_write_cost_usd', MONEY)):
        op.add_column('ledger_daily', sa.Column(column, kind, server_default=sa.text('0'), nullable=False))
        op.alter_column('ledger_daily', column, server_default=None)
    op.execute(_apply_function((*OLD_SUMS, *NEW_SUMS)))
    for statement in _views(cache_writes=True):
        op.execute(statement)


def downgrade() -> None:
    # a view's columns can only be added to in place: drop them (dependents first) and create 0002's
    for name, _ in reversed(GROUPED):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS cost_daily")
    op.execute("DROP VIEW IF EXISTS cost_ledger")
    op.execute(_apply_function(OLD_SUMS))
    for statement in _views(cache_writes=False):
        op.execute(statement)
    op.drop_column('ledger_daily', 'cache_write_cost_usd')
    op.drop_column('ledger_daily', 'cache_write_tokens')
    op.drop_constraint(op.f(TOKEN_CHECK), 'ledger_entries', type_='check')
    op.create_check_constraint(op.f(TOKEN_CHECK), 'ledger_entries', OLD_TOKEN_RULE)
    for column in ('batch_discount', 'cache_write_cost_usd', 'cache_write_price', 'cache_write_tokens'):
        op.drop_column('ledger_entries', column)
