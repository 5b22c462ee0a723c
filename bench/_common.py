"""Helpers shared by the bench scripts: raw-limit probes (Postgres COPY, pipelined multi-row INSERT,
Redis pipelined LPUSH), a resident-memory sampler for process trees, and Redis key cleanup.

Not a test module; imported by scripts run as `.venv/bin/python bench/<script>.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from tierbatch.base.settings import DEFAULT_DATABASE_URL

# The columns of a task that the batch path reads: a row as `route_queued_tasks` leaves it.
TASK_COLUMNS = ("id", "tenant_id", "task_type", "requested_tier", "tier", "tier_reason", "urgent", "request",
                "metadata", "status", "mode", "provider", "model", "attempts", "dispatched_at")
LABELS = ("billing", "account", "bug")
SYSTEM_PROMPT = "Route the support ticket."
TICKET = "ticket {i}: I was charged twice for my subscription this month, please refund"


def label_request(i: int) -> str:
    """A stored request of a labelled classification job (as `POST /v1/jobs` writes it), as JSON text."""
    from tierbatch.jobs.rows import label_response_format

    return json.dumps({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": "Ticket: " + TICKET.format(i=i)}],
                       "response_format": label_response_format(LABELS)})


def waiting_rows(tenant_id: uuid.UUID, n: int, provider: str, model: str) -> Iterator[tuple[Any, ...]]:
    """n task-like rows in `TASK_COLUMNS` order: Light, non-urgent, `waiting_batch`."""
    from tierbatch.base.ids import new_task_ids

    now = datetime.now(UTC)
    tenant = str(tenant_id)
    for i, task_id in enumerate(new_task_ids(n)):  # the product's ids: this month's partition
        yield (task_id, tenant, "classification", "light", "light", "requested", False, label_request(i),
               "{}", "waiting_batch", "batch", provider, model, 0, now)


def copy_rows(conn: psycopg.Connection[Any], table: str, rows: Iterator[tuple[Any, ...]],
              columns: Sequence[str] = TASK_COLUMNS) -> int:
    written = 0
    with conn.cursor() as cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            written += 1
    return written


def _scratch_table(conn: psycopg.Connection[Any]) -> str:
    """A table shaped like `tasks` without its indexes and constraints: the raw limit."""
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE TABLE {table} (LIKE tasks INCLUDING DEFAULTS)")
    conn.commit()
    return table


def copy_rate(dsn: str, n: int) -> float:
    """COPY n task-like rows into a scratch table (no indexes), one transaction; rows/s."""
    rows = list(waiting_rows(uuid.uuid4(), n, "sim", "gpt-4o-mini"))  # built before the clock starts
    with psycopg.connect(dsn) as conn:
        table = _scratch_table(conn)
        try:
            started = time.perf_counter()
            copy_rows(conn, table, iter(rows))
            conn.commit()
            return n / (time.perf_counter() - started)
        finally:
            conn.execute(f"DROP TABLE {table}")
            conn.commit()


def insert_rate(dsn: str, n: int, rows_per_statement: int = 500) -> float:
    """Multi-row INSERTs of `rows_per_statement` rows, pipelined, one transaction; rows/s.

    Uses `psycopg.RawCursor` (native `$n` placeholders): psycopg parses `%s` queries in Python and caches
    only short ones, so a 500-row `%s` statement costs more in the client than in the server.
    """
    rows = list(waiting_rows(uuid.uuid4(), n, "sim", "gpt-4o-mini"))
    width = len(TASK_COLUMNS)
    with psycopg.connect(dsn, cursor_factory=psycopg.RawCursor) as conn:
        table = _scratch_table(conn)
        try:
            def statement(count: int) -> str:
                values = ", ".join("(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")"
                                   for r in range(count))
                return f"INSERT INTO {table} ({', '.join(TASK_COLUMNS)}) VALUES {values}"

            full = statement(rows_per_statement)
            started = time.perf_counter()
            with conn.pipeline(), conn.cursor() as cursor:
                for start in range(0, n, rows_per_statement):
                    chunk = rows[start:start + rows_per_statement]
                    sql = full if len(chunk) == rows_per_statement else statement(len(chunk))
                    cursor.execute(sql, [value for row in chunk for value in row])
            conn.commit()
            return n / (time.perf_counter() - started)
        finally:
            conn.execute(f"DROP TABLE {table}")
            conn.commit()


def redis_lpush_rate(redis_url: str, key: str, n: int, per_pipeline: int = 1000) -> float:
    """Pipelined LPUSH of n ~1 KB messages (a Celery message's size) onto a throwaway key; ops/s."""
    payload = json.dumps({"body": "x" * 900, "headers": {"task": "tierbatch.dispatch_tasks"}})
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(key)
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.lpush(key, payload)
            if (i + 1) % per_pipeline == 0:
                pipe.execute()
        pipe.execute()
        return n / (time.perf_counter() - started)
    finally:
        client.delete(key)
        client.close()


def delete_redis_keys(redis_url: str, prefix: str) -> int:
    """Delete every key under a run's own prefix; other runs' keys are left alone."""
    if not prefix:
        raise ValueError("refusing to delete keys without a prefix")
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


@dataclass
class RssPeaks:
    process: float = 0.0  # largest single process of the tree, bytes
    tree: float = 0.0  # largest sum over the tree at one sample, bytes
    pids: set[int] = field(default_factory=set)


class RssSampler:
    """Samples the resident memory of named process trees (a prefork worker has children)."""

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.peaks = {name: RssPeaks() for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0.0
            peaks = self.peaks[name]
            for proc in procs:
                try:
                    rss = float(proc.memory_info().rss)
                except psutil.Error:
                    continue
                total += rss
                peaks.process = max(peaks.process, rss)
                peaks.pids.add(proc.pid)
            peaks.tree = max(peaks.tree, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# --- a run's logs and Redis keys ------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--logs", type=Path, help="keep process logs here (default: a temporary directory)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="server for the scratch databases")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                        help="broker; this run only touches keys under its own prefix")


@dataclass
class RunPlace:
    logs: Path
    redis_prefix: str
    failed: bool = False  # keeps a temporary log directory for reading


@contextlib.contextmanager
def run_place(args: argparse.Namespace, name: str) -> Iterator[RunPlace]:
    """The run's log directory and Redis prefix; on the way out its keys are deleted and a temporary log
    directory removed (kept, and named, when the run failed)."""
    # a plain `kill` or `timeout` still runs the finally blocks: processes stopped, databases dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = args.logs or Path(tempfile.mkdtemp(prefix=f"tierbatch-{name}-"))
    logs.mkdir(parents=True, exist_ok=True)
    place = RunPlace(logs, f"tbbench-{uuid.uuid4().hex[:8]}:")
    try:
        yield place
    finally:
        delete_redis_keys(args.redis_url, place.redis_prefix)
        if args.logs is None:
            if place.failed:
                print(f"process logs kept in {logs}", flush=True)
            else:
                shutil.rmtree(logs, ignore_errors=True)
