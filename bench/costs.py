"""Cost queries over a 10,000,000-row ledger (target: under 1 s), beside the same queries on raw rows.

    .venv/bin/python bench/costs.py                      # 10M rows, 90 days, 20 tenants
    .venv/bin/python bench/costs.py --rows 1000000       # quicker
    .venv/bin/python bench/costs.py --keep               # keep the scratch database afterwards

Makes a scratch database on the server of DATABASE_URL (migrated to head) and fills `ledger_entries`
in bulk with `INSERT … SELECT … FROM generate_series` in chunks of `--chunk` rows (rows are generated
inside Postgres: no client round trips, faster than COPY from the client). Each chunk is one
statement, so the rollup trigger of migration 0002 fires once per chunk and `ledger_daily` is kept in
step by the same transactions, as in production. The rows: 20 tenants, 6 task types, one job per
tenant and day for half the rows, modes batch 55% / immediate 35% / cache 5% / shadow 5%, models
gpt-4o, gpt-4o-mini, an override-priced local model and 0.5% unpriced rows, created in time order
over `--days` days up to now. Each row's task id is a time-ordered id of its instant, so the rows spread
over the monthly partitions of those days (made first, as the beat makes them: migration 0016).

One shortcut: no task rows (the ledger has no foreign key to them since migration 0014; no query here
reads `tasks`). Tenants and jobs exist.

Then it times, with the code the API runs (tierbatch.costs.query.run_cost_query, median of --runs):
all tenants by day and model (all time, and the last 7 days from an instant that is not a day
boundary, so partial days are read from the ledger), one tenant by task type over 30 days, the
month-to-date budget check; and for comparison the first and third queries on ledger rows only.
It also measures what the trigger costs a bulk insert. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select

from tests.support.stack import psycopg_dsn, scratch_database
from tierbatch.base.ids import Month
from tierbatch.base.settings import DEFAULT_DATABASE_URL
from tierbatch.costs.budgets import budget_status
from tierbatch.costs.query import CostQuery, Filters, run_cost_query
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import LedgerDaily
from tierbatch.db.partitions import PARTITIONED, create_month_partition, month_partition, partitions
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.tasks.partitions import covered

TARGET_SECONDS = 1.0
TASK_TYPES = ("classification", "extraction", "summarization", "reasoning", "translation", "general")

# Prices (USD per 1M tokens, immediate; batch halves input and output, cached keeps its rate as genai-prices
# does for OpenAI): gpt-4o 2.50 / 1.25 / 10, gpt-4o-mini 0.15 / 0.075 / 0.60, my-local-llama 0.05 / 0.05 / 0.10.
# Dimensions are drawn independently per row (random()), so nearly every (tenant, task type, model, mode, job)
# combination occurs every day: the rollup is as large as this schema makes it.
FILL_SQL = """
INSERT INTO ledger_entries (
    tenant_id, task_id, job_id, task_type, tier, mode, provider, requested_model, served_model,
    input_tokens, cached_tokens, output_tokens, reasoning_tokens, input_price, cached_input_price, output_price,
    input_cost_usd, cached_input_cost_usd, output_cost_usd, cost_usd, baseline_cost_usd, unpriced, created_at)
SELECT
    tenant_id, task_id, job_id, task_type, (CASE WHEN model = 'gpt-4o' THEN 'complex' ELSE 'light' END)::tier,
    mode::serve_mode, 'sim', model, model, input_tokens, cached_tokens, output_tokens, reasoning_tokens,
    p_in, p_cached, p_out,
    round((input_tokens - cached_tokens) * p_in / 1e6, 10), round(cached_tokens * p_cached / 1e6, 10),
    round(output_tokens * p_out / 1e6, 10),
    CASE WHEN mode = 'cache' THEN 0
         ELSE round((input_tokens - cached_tokens) * p_in / 1e6, 10) + round(cached_tokens * p_cached / 1e6, 10)
              + round(output_tokens * p_out / 1e6, 10) END,
    round((input_tokens - cached_tokens) * 2.5 / 1e6, 10) + round(cached_tokens * 1.25 / 1e6, 10)
        + round(output_tokens * 10.0 / 1e6, 10),
    p_in IS NULL AND mode <> 'cache',
    created_at
FROM (
    SELECT m.*,
           -- a time-ordered task id of the row's instant (tierbatch/base/ids.py): the row lives in that month's
           -- partition, as a real ledger row lives in its task's
           (lpad(to_hex(floor(extract(epoch FROM m.created_at) * 1000)::bigint), 12, '0') || '7'
            || lpad(to_hex(m.i), 19, '0'))::uuid AS task_id,
           CASE model WHEN 'gpt-4o' THEN 2.5 WHEN 'gpt-4o-mini' THEN 0.15 WHEN 'my-local-llama' THEN 0.05 END
               * CASE WHEN mode = 'batch' THEN 0.5 ELSE 1 END AS p_in,
           CASE model WHEN 'gpt-4o' THEN 1.25 WHEN 'gpt-4o-mini' THEN 0.075 WHEN 'my-local-llama' THEN 0.05 END
               AS p_cached,
           CASE model WHEN 'gpt-4o' THEN 10.0 WHEN 'gpt-4o-mini' THEN 0.6 WHEN 'my-local-llama' THEN 0.1 END
               * CASE WHEN mode = 'batch' THEN 0.5 ELSE 1 END AS p_out
    FROM (
        SELECT d.*,
               CASE WHEN mode = 'shadow' THEN 'gpt-4o'
                    WHEN mode IN ('batch', 'cache') THEN 'gpt-4o-mini'
                    WHEN pick < 0.005 THEN 'mystery-model'
                    WHEN pick < 0.4 THEN 'gpt-4o'
                    WHEN pick < 0.8 THEN 'gpt-4o-mini'
                    ELSE 'my-local-llama' END AS model
        FROM (
            SELECT i,
                   (%(tenants)s::uuid[])[1 + t] AS tenant_id,
                   CASE WHEN in_job THEN (%(jobs)s::uuid[])[
                       1 + t * %(days)s + least(%(days)s - 1, floor(i::numeric * %(days)s / %(rows)s)::int)] END
                       AS job_id,
                   (%(task_types)s::text[])[1 + tt] AS task_type,
                   CASE WHEN mo < 55 THEN 'batch' WHEN mo < 90 THEN 'immediate'
                        WHEN mo < 95 THEN 'cache' ELSE 'shadow' END AS mode,
                   pick,
                   input_tokens,
                   CASE WHEN cached THEN (input_tokens / 256) * 128 ELSE 0 END AS cached_tokens,
                   output_tokens,
                   CASE WHEN reasoning THEN output_tokens / 4 ELSE 0 END AS reasoning_tokens,
                   %(end)s::timestamptz - make_interval(secs => %(span)s * (%(rows)s - i) / %(rows)s) AS created_at
            FROM (
                SELECT i,
                       floor(random() * %(n_tenants)s)::int AS t,
                       floor(random() * 6)::int AS tt,
                       floor(random() * 100)::int AS mo,
                       random() AS pick,
                       random() < 0.5 AS in_job,
                       200 + floor(random() * 3000)::int AS input_tokens,
                       20 + floor(random() * 400)::int AS output_tokens,
                       random() < 0.5 AS cached,
                       random() < 0.1 AS reasoning
                FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS i
            ) AS r
        ) AS d
    ) AS m
) AS priced
"""


def median_time(action: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(runs):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def make_partitions(url: str, first: datetime, last: datetime) -> list[str]:
    """The monthly partitions of the months from `first` to `last` (the migration of an empty database made
    this month's and the next), as the beat makes them."""
    engine = make_engine(url)
    made = []
    try:
        month = Month.of(first)
        while month <= Month.of(last):
            for parent in PARTITIONED:
                with engine.begin() as connection:
                    if not covered(partitions(connection, parent), month):
                        create_month_partition(connection, parent, month)
                        made.append(month_partition(parent, month))
            month = month.plus(1)
    finally:
        engine.dispose()
    return made


def fill(url: str, rows: int, days: int, n_tenants: int, chunk: int) -> tuple[float, list[uuid.UUID]]:
    tenants = [uuid.uuid4() for _ in range(n_tenants)]
    jobs = [uuid.uuid4() for _ in range(n_tenants * days)]
    end = datetime.now(UTC)
    made = make_partitions(url, end - timedelta(days=days), end)
    print(f"  partitions made for the rows' months: {', '.join(made) or 'none'}", flush=True)
    dsn = psycopg_dsn(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO tenants (id, name) VALUES (%s, %s)",
                            [(t, f"tenant-{i}") for i, t in enumerate(tenants)])
            cur.executemany("INSERT INTO jobs (id, tenant_id, name, task_type, requested_tier, urgent) "
                            "VALUES (%s, %s, %s, 'classification', 'light', false)",
                            [(jobs[t * days + d], tenants[t], f"nightly-{t}-{d}")
                             for t in range(n_tenants) for d in range(days)])
        started = time.perf_counter()
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk) - 1
            conn.execute(FILL_SQL, {"tenants": tenants, "n_tenants": n_tenants, "jobs": jobs, "days": days,
                                    "rows": rows, "task_types": list(TASK_TYPES), "end": end,
                                    "span": days * 86_400.0, "start": start, "stop": stop})
            done = stop + 1
            elapsed = time.perf_counter() - started
            print(f"  filled {done:>12,} rows  {elapsed:7.1f}s  {done / elapsed:>9,.0f} rows/s", flush=True)
        fill_seconds = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE ledger_entries")
        conn.execute("VACUUM ANALYZE ledger_daily")
    return fill_seconds, tenants


def trigger_cost(dsn: str, n: int) -> tuple[float, float]:
    """Seconds to insert n more rows with and without the rollup trigger (each rolled back)."""
    params = {"tenants": [], "n_tenants": 1, "jobs": [], "days": 1, "rows": n, "task_types": list(TASK_TYPES),
              "end": datetime.now(UTC), "span": 3600.0, "start": 10**12, "stop": 10**12 + n - 1}
    out = []
    with psycopg.connect(dsn) as conn:
        tenant = conn.execute("SELECT id FROM tenants LIMIT 1").fetchone()
        assert tenant is not None
        params["tenants"] = [tenant[0]]
        for with_trigger in (False, True):
            if not with_trigger:
                conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_daily_insert")
            started = time.perf_counter()
            conn.execute(FILL_SQL, params)
            out.append(time.perf_counter() - started)
            conn.rollback()
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=500_000, help="rows per INSERT statement")
    parser.add_argument("--runs", type=int, default=5, help="runs per query (median)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    args = parser.parse_args()

    with scratch_database(args.database_url, prefix="tierbatch_bench_costs") as url:
        upgrade_to_head(url)
        dsn = psycopg_dsn(url)
        print(f"filling the ledger: {args.rows:,} rows over {args.days} days, {args.tenants} tenants", flush=True)
        fill_seconds, tenants = fill(url, args.rows, args.days, args.tenants, args.chunk)
        plain, triggered = trigger_cost(dsn, 200_000)

        engine = make_engine(url)
        sessions = make_session_factory(engine)
        now = datetime.now(UTC)
        week_ago = now - timedelta(days=7)
        month_ago = now - timedelta(days=30)
        tenant = tenants[0]
        figures: list[tuple[str, float, bool]] = []
        try:
            with sessions() as session:
                daily_rows = session.scalar(select(func.count()).select_from(LedgerDaily.__table__))

                def cost(dims: tuple[str, ...], filters: Filters, use_rollup: bool = True) -> Any:
                    return run_cost_query(session, CostQuery(dims, filters, 100_000), use_rollup=use_rollup)

                def probe(label: str, action: Callable[[], Any], runs: int = args.runs,
                          target: bool = True) -> Any:
                    seconds, result = median_time(action, runs)
                    figures.append((label, seconds, target))
                    print(f"  {label}: {seconds:.3f}s", flush=True)
                    return result

                all_time = probe("all tenants, all time, by day and model",
                                 lambda: cost(("day", "model"), Filters()))
                probe("all tenants, last 7 days (partial first day), by day and model",
                      lambda: cost(("day", "model"), Filters(since=week_ago)))
                probe("one tenant, last 30 days, by task_type",
                      lambda: cost(("task_type",), Filters(since=month_ago, tenant_id=tenant)))
                probe("one tenant, month-to-date budget check",
                      lambda: budget_status(session, tenant, Decimal(100)))
                probe("all tenants, last 24 hours, by hour (ledger rows)",
                      lambda: cost(("hour",), Filters(since=now - timedelta(hours=24))))
                raw = probe("raw ledger rows only: all tenants, all time, by day and model",
                            lambda: cost(("day", "model"), Filters(), use_rollup=False), runs=1, target=False)
                probe("raw ledger rows only: one tenant, last 30 days, by task_type",
                      lambda: cost(("task_type",), Filters(since=month_ago, tenant_id=tenant), use_rollup=False),
                      runs=1, target=False)
                assert all_time.totals == raw.totals, "rollup and ledger disagree"
                requests = all_time.totals.requests
        finally:
            engine.dispose()

        print()
        print(f"ledger rows: {requests:,}; ledger_daily rows: {daily_rows:,}")
        print(f"fill: {fill_seconds:.0f}s = {args.rows / fill_seconds:,.0f} rows/s (INSERT … SELECT generate_series, "
              f"{args.chunk:,}-row statements, trigger on)")
        print(f"trigger cost on a 200,000-row insert: {plain:.2f}s without, {triggered:.2f}s with "
              f"(+{(triggered - plain) / plain:.0%})")
        print()
        print(f"{'query':<68}{'median':>9}  {'target':>7}")
        for label, seconds, target in figures:
            verdict = ("ok" if seconds < TARGET_SECONDS else "OVER") if target else "(for comparison)"
            print(f"{label:<68}{seconds:>8.3f}s  {'< 1 s':>7}  {verdict}")
        if args.keep:
            print(f"\nkept database: {url}")
            input("press Enter to drop it… ")


if __name__ == "__main__":
    main()
