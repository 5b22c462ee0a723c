"""Bulk ingest through `POST /v1/jobs` (target: ≥ 20,000 tasks/s), beside the raw Postgres COPY rate.

    .venv/bin/python bench/ingest.py                       # self-contained: scratch database + API process
    .venv/bin/python bench/ingest.py --api-url http://127.0.0.1:8000 --api-key tb_...   # a running API

Self-contained mode makes a scratch database on the server of DATABASE_URL (migrated to head), starts
`tierbatch api` against it with no worker (dispatch messages wait in Redis and are deleted afterwards),
posts `--items` items per job `--runs` times and prints the median rate. In the same run it measures
COPY of the same task-like rows into a scratch table without indexes (the raw limit) and into a copy
of `tasks` with all its indexes (what the API's COPY pays). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.procs import ManagedProcess, free_port, python_module, wait_http_ok
from tests.support.stack import ADMIN_TOKEN, psycopg_dsn, scratch_database, write_app_config
from tierbatch.base.settings import DEFAULT_DATABASE_URL
from tierbatch.db.bulk_sql import TASK_COPY_COLUMNS
from tierbatch.migrations.runner import upgrade_to_head

TARGET = 20_000
ROW_TEXT = "ticket {i}: I was charged twice for my subscription this month, please refund"


def job_body(name: str, n: int) -> bytes:
    return json.dumps({
        "name": name, "task_type": "classification", "labels": ["billing", "account", "bug"],
        "system": "Route the support ticket.", "template": "Ticket: {text}",
        "items": [{"id": f"t{i}", "text": ROW_TEXT.format(i=i)} for i in range(n)],
    }).encode()


def post_jobs(api_url: str, api_key: str, n: int, runs: int) -> list[tuple[float, dict[str, object]]]:
    results = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}",
                                                 "Content-Type": "application/json"}, timeout=300) as client:
        client.post("/v1/jobs", content=job_body(f"warmup-{uuid.uuid4().hex[:6]}", 100)).raise_for_status()
        for run in range(runs):
            body = job_body(f"bench-ingest-{uuid.uuid4().hex[:6]}-{run}", n)
            started = time.perf_counter()
            response = client.post("/v1/jobs", content=body)
            elapsed = time.perf_counter() - started
            if response.status_code != 202:
                sys.exit(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
            answer = response.json()
            results.append((n / elapsed, answer))
            print(f"  run {run + 1}: {n} items in {elapsed:.2f}s = {n / elapsed:,.0f} tasks/s "
                  f"({answer['dispatch_messages']} dispatch messages)", flush=True)
            # spare whatever worker may be listening the work of the benchmark's tasks
            client.post(f"/v1/jobs/{answer['id']}/cancel")
    return results


def copy_rate(dsn: str, n: int, with_indexes: bool) -> float:
    """COPY n task-like rows (same shape as the API writes) into a scratch table; rows/s."""
    table = f"bench_copy_{uuid.uuid4().hex[:8]}"
    like = "INCLUDING ALL" if with_indexes else "INCLUDING DEFAULTS"
    prefix = ('{"messages": [{"role": "system", "content": "Route the support ticket."}, '
              '{"role": "user", "content": ')
    now = datetime.now(UTC)
    tenant = str(uuid.uuid4())
    with psycopg.connect(dsn) as conn:
        conn.execute(f"CREATE TABLE {table} (LIKE tasks {like})")
        conn.commit()
        try:
            job = str(uuid.uuid4())
            started = time.perf_counter()
            statement = f"COPY {table} ({', '.join(TASK_COPY_COLUMNS)}) FROM STDIN"
            with conn.cursor() as cursor, cursor.copy(statement) as copy:
                for i in range(n):
                    request = prefix + json.dumps("Ticket: " + ROW_TEXT.format(i=i)) + "}]}"
                    copy.write_row((uuid.uuid4(), f"t{i}", request, "light", "config routing", tenant, job,
                                    "classification", "auto", False, None, "{}", "queued", 0, now, None, None, None))
            conn.commit()
            return n / (time.perf_counter() - started)
        finally:
            conn.execute(f"DROP TABLE {table}")
            conn.commit()


@contextmanager
def self_contained_api(base_database_url: str, redis_url: str) -> Iterator[tuple[str, str, str]]:
    """A scratch database and an API process; yields (api_url, api_key, database_url)."""
    with ExitStack() as stack:
        database_url = stack.enter_context(scratch_database(base_database_url, prefix="tierbatch_bench"))
        upgrade_to_head(database_url)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tierbatch-bench-")))
        config = write_app_config(tmp / "tierbatch.toml", free_port())
        port = free_port()
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TIERBATCH_CONFIG": str(config),
               "TIERBATCH_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONUNBUFFERED": "1"}
        api = ManagedProcess(python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)), env=env,
                             log_path=tmp / "api.log")
        stack.callback(api.stop)
        api_url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{api_url}/healthz", proc=api)
        response = httpx.post(f"{api_url}/v1/admin/tenants", json={"name": "bench"},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        response.raise_for_status()
        stack.callback(drop_dispatch_queue, redis_url)
        yield api_url, str(response.json()["api_key"]), database_url


def drop_dispatch_queue(redis_url: str) -> None:
    """No worker ran: the benchmark's dispatch messages are left in the queue; remove them."""
    import redis

    from tierbatch.base.messaging import QUEUE_DISPATCH

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(QUEUE_DISPATCH)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="items per job (max 100,000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--api-url", help="use a running API instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("TIERBATCH_API_KEY"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="server for the scratch database and the COPY probe")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12",
                        help="broker of the self-started API (its dispatch queue is deleted afterwards)")
    args = parser.parse_args()

    print(f"bulk ingest: {args.runs} jobs of {args.items:,} items through POST /v1/jobs", flush=True)
    with ExitStack() as stack:
        if args.api_url:
            if not args.api_key:
                sys.exit("--api-key (or TIERBATCH_API_KEY) is required with --api-url")
            api_url, api_key, database_url = args.api_url, args.api_key, args.database_url
        else:
            api_url, api_key, database_url = stack.enter_context(
                self_contained_api(args.database_url, args.redis_url))
        runs = post_jobs(api_url, api_key, args.items, args.runs)
        dsn = psycopg_dsn(database_url)
        raw = statistics.median(copy_rate(dsn, args.items, with_indexes=False) for _ in range(args.runs))
        indexed = statistics.median(copy_rate(dsn, args.items, with_indexes=True) for _ in range(args.runs))

    rate = statistics.median(r for r, _ in runs)
    messages = runs[0][1]["dispatch_messages"]
    print()
    print(f"{'probe':<58}{'figure':>18}")
    print(f"{'POST /v1/jobs, 100k-item jobs (median, client wall time)':<58}{rate:>12,.0f} tasks/s")
    print(f"{'Postgres COPY, task-like rows, scratch table, no indexes':<58}{raw:>13,.0f} rows/s")
    print(f"{'Postgres COPY, same rows, table with the tasks indexes':<58}{indexed:>13,.0f} rows/s")
    print(f"{'dispatch messages per job':<58}{messages:>18}")
    print(f"ingest / raw COPY = {rate / raw:.0%}; ingest / indexed COPY = {rate / indexed:.0%}")
    verdict = "meets" if rate >= TARGET else "MISSES"
    print(f"target: ≥ {TARGET:,} tasks/s: {verdict} it")


if __name__ == "__main__":
    main()
