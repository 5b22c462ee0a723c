"""A backlog of immediate calls drained at the provider's pace: how many tasks the reconciler sends again.

    .venv/bin/python bench/backlog.py [--tasks 600] [--latency-ms 200] [--runs 3]

Starts the simulator, API, worker (4 threads) and beat on a scratch database, with the integration tests'
reconciler (a run every second, a queued task stale after 3 s), lets the reconciler run a few times, then
submits `--tasks` urgent Complex tasks at once against a simulator answering each call in `--latency-ms`:
the immediate queue holds a backlog for ~tasks × latency / 4 seconds, many times the staleness. Prints,
per run, the time until every task is terminal, the tasks the reconciler re-dispatched (each is one more
message through dispatch and the immediate queue, and one more claim that finds the task done) and the
provider calls (the raw floor: one per task). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import TEST_REDIS_URL
from tests.support.procs import free_port, wait_until
from tests.support.stack import Stack, delete_redis_keys, psycopg_dsn, scratch_database, write_app_config
from tierbatch.base.settings import DEFAULT_DATABASE_URL
from tierbatch.migrations.runner import upgrade_to_head

REDISPATCHED = re.compile(r"re-dispatched (\d+) tasks")


def one_run(base_url: str, tasks: int, latency_ms: int) -> tuple[float, int, int]:
    """(seconds until all terminal, tasks re-dispatched, provider calls)."""
    with scratch_database(base_url, prefix="tierbatch_bench") as database_url:
        upgrade_to_head(database_url)
        tmp = Path(tempfile.mkdtemp(prefix="tierbatch-backlog-"))
        port = free_port()
        stack = Stack(tmp=tmp, database_url=database_url, redis_url=TEST_REDIS_URL,
                      config_path=write_app_config(tmp / "tierbatch.toml", port), simulator_port=port,
                      api_port=free_port())
        try:
            stack.start_simulator()
            stack.start_api()
            stack.start_worker()
            stack.start_beat()
            stack.sim("POST", "/_sim/config", {"models": {"*": {"latency_ms": [latency_ms, latency_ms],
                                                                "error_rate": 0.0, "slow_rate": 0.0}}})
            key = stack.new_tenant_key("backlog")
            worker_log = stack.processes["worker"].log_path
            assert worker_log is not None
            # beat has been running a while, as in production: the reconciler ran before the backlog
            wait_until(lambda: worker_log.read_text().count("tierbatch.reconcile[") >= 6, 60, 0.2, "reconciler runs")
            started = time.monotonic()
            with stack.client(key) as client:
                for start in range(0, tasks, 500):
                    response = client.post("/v1/tasks", json={"tasks": [
                        {"prompt": f"question {i}", "urgent": True, "task_type": "reasoning"}
                        for i in range(start, min(tasks, start + 500))]})
                    response.raise_for_status()
            dsn = psycopg_dsn(database_url)

            def all_terminal() -> bool:
                with psycopg.connect(dsn) as conn:
                    row = conn.execute("SELECT count(*) FROM tasks WHERE status IN ('succeeded', 'failed')").fetchone()
                    return row is not None and int(row[0]) >= tasks

            wait_until(all_terminal, 900, 0.5, "every task terminal")
            elapsed = time.monotonic() - started
            redispatched = sum(int(n) for n in REDISPATCHED.findall(worker_log.read_text()))
            calls = sum(stack.sim("GET", "/_sim/stats")["chat_calls"].values())
            return elapsed, redispatched, calls
        finally:
            stack.stop_all()
            delete_redis_keys(stack.redis_prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        elapsed, redispatched, calls = one_run(args.database_url, args.tasks, args.latency_ms)
        results.append((elapsed, redispatched, calls))
        print(f"run {run + 1}: {args.tasks} tasks terminal in {elapsed:.1f}s; re-dispatched by the reconciler "
              f"{redispatched}; provider calls {calls} (floor: {args.tasks})", flush=True)
    print(f"median: {statistics.median(r[0] for r in results):.1f}s, "
          f"re-dispatched {statistics.median(r[1] for r in results):.0f} "
          f"({statistics.median(r[1] for r in results) / args.tasks:.2f} per task), "
          f"provider calls {statistics.median(r[2] for r in results):.0f} for {args.tasks} tasks")


if __name__ == "__main__":
    main()
