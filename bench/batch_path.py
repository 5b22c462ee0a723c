"""The batch path against its targets (README, Benchmarks), each figure beside the raw limit measured in the same run.

    .venv/bin/python bench/batch_path.py                      # everything (a few minutes on 2 cores)
    .venv/bin/python bench/batch_path.py --skip-e2e           # raw limits + 50,000-line batch only
    .venv/bin/python bench/batch_path.py --pool both          # end to end with prefork and threads
    .venv/bin/python bench/batch_path.py --profile            # cProfile of claim/submit and ingestion

1. Raw limits: Postgres COPY of task-like rows into a scratch table, pipelined multi-row INSERT,
   Redis pipelined LPUSH (on a throwaway key under this run's prefix).
2. A 50,000-line batch, in process: COPY 50,000 `waiting_batch` tasks into a scratch database
   migrated to head, `claim_batch` (one transaction), then `tierbatch.worker.batch.submit_batch` against a
   simulator process, timed by step (build the JSONL, upload, create).
3. Its output ingested, in process: the simulator completes it (durations 0.05 s), `poll_batches`
   moves it to `ingesting`, `ingest_batch` is timed (lines/s).
4. End to end: simulator, API, worker and beat as processes on another scratch database; N Light
   non-urgent tasks submitted through `POST /v1/jobs` (or `POST /v1/tasks` in requests of 1,000);
   time until all are `succeeded` (counted in SQL every 0.25 s).
5. Peak resident memory of the API and worker processes during step 4.

Every process is stopped, every scratch database dropped, every Redis key of the run deleted.
Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import pstats
import re
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    LABELS,
    SYSTEM_PROMPT,
    TICKET,
    RssSampler,
    add_run_arguments,
    copy_rate,
    copy_rows,
    delete_redis_keys,
    insert_rate,
    label_request,
    redis_lpush_rate,
    run_place,
    waiting_rows,
)
from tests.support.procs import REPO_ROOT, ManagedProcess, free_port, python_module, wait_http_ok
from tests.support.stack import Stack, psycopg_dsn, scratch_database, write_app_config
from tierbatch.base.config import load_config
from tierbatch.base.ids import new_task_ids
from tierbatch.base.settings import Settings
from tierbatch.base.states import BatchStatus
from tierbatch.db.models import ProviderBatch
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.providers.client import ProviderBatches
from tierbatch.worker import batch as worker_batch
from tierbatch.worker.context import WorkerContext, build_worker_context

BATCH_LINES = 50_000
TARGET_SUBMIT_SECONDS = 3.0
TARGET_INGEST_RATE = 30_000.0
TARGET_E2E_SECONDS = 30.0
TARGET_RSS_MB = 500.0
REFERENCE = {"copy": 90_000.0, "insert": 50_000.0, "lpush": 80_000.0}  # the README's Benchmarks table
SIM_FAST = {"batch": {"validating_seconds": 0.05, "in_progress_seconds": 0.05, "finalizing_seconds": 0.05,
                      "line_error_rate": 0.0, "expire": False, "enqueued_token_limit": 0},
            "models": {"*": {"latency_ms": [1, 5], "error_rate": 0.0}}}
BATCH_OVERRIDES = {"max_requests": "50000", "max_wait_seconds": "1", "poll_interval_seconds": "0.5",
                   "assemble_interval_seconds": "0.5", "ingest_chunk_lines": "10000"}
# The tests' reconciler resumes a batch untouched for 3 s; under a 100,000-task backlog that re-sends
# INGEST/SUBMIT for batches whose message is only waiting in the queue. The bench uses the product's
# defaults unless --test-reconciler is given.
RECONCILER_DEFAULTS = {"interval_seconds": "15", "queued_stale_seconds": "60", "batch_stale_seconds": "120"}
TASK_LOG = re.compile(r"Task (tierbatch[\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")
MB = 1024 * 1024
F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    print(message, flush=True)


# --- configuration ---------------------------------------------------------------------------------


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Every process's user + system CPU seconds so far, with its command name (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, tail = stat.read_text().rpartition(")")
        except OSError:
            continue  # gone meanwhile
        fields = tail.split()
        out[int(stat.parent.name)] = (head.partition("(")[2], (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds between two snapshots: this process (the worker's code), Postgres (every backend), the
    rest by command name (the simulator is a python process), largest first."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        delta = seconds - before.get(pid, (name, 0.0))[1]
        label = "this process" if pid == os.getpid() else ("Postgres" if name == "postgres" else name)
        spent[label] += delta
    return {k: v for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def bench_config(path: Path, simulator_port: int, test_reconciler: bool = False) -> Path:
    """The integration tests' config with the [batch] limits of a production-sized batch."""
    write_app_config(path, simulator_port)
    text = path.read_text()
    overrides = BATCH_OVERRIDES if test_reconciler else {**BATCH_OVERRIDES, **RECONCILER_DEFAULTS}
    for key, value in overrides.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"bench config: expected one '{key}' line, found {count}")
    path.write_text(text)
    return path


def worker_context(database_url: str, redis_url: str, config_path: Path) -> WorkerContext:
    """The worker's context for an explicit database and config (no environment)."""
    values: dict[str, Any] = {"DATABASE_URL": database_url, "REDIS_URL": redis_url,
                              "TIERBATCH_CONFIG": str(config_path)}
    settings = Settings(**values)
    config = load_config(config_path)
    return build_worker_context(settings, config)


def configure_simulator(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        client.post("/_sim/config", json=SIM_FAST).raise_for_status()


# --- step timing --------------------------------------------------------------------------------------


WRITER_STEP = "write results + ledger (writer thread, overlapped)"


class StepClock:
    """Wraps functions (module attributes, class methods) to add up the time spent in each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: F) -> F:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed  # type: ignore[return-value]

    def wrap_iterator(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """Time spent inside the generator (reading the stream), not in the caller's loop body."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            iterator = fn(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self.seconds[name] += time.perf_counter() - started
                    return
                self.seconds[name] += time.perf_counter() - started
                yield item

        return timed


@contextlib.contextmanager
def profiled(enabled: bool, title: str, limit: int = 18) -> Iterator[None]:
    if not enabled:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("cumulative").print_stats(limit)
        stats.sort_stats("tottime").print_stats(limit)
        say(f"\n--- cProfile: {title} ---")
        text = out.getvalue()
        say(text.replace(str(REPO_ROOT) + "/", ""))


# --- 1. raw limits ----------------------------------------------------------------------------------


@dataclass
class RawLimits:
    copy_rows_s: float
    insert_rows_s: float
    lpush_ops_s: float


def measure_raw_limits(dsn: str, redis_url: str, key: str, n: int, repeat: int) -> RawLimits:
    say(f"raw limits: {repeat} runs each of {n:,} rows / ops")
    copies = [copy_rate(dsn, n) for _ in range(repeat)]
    inserts = [insert_rate(dsn, n) for _ in range(repeat)]
    pushes = [redis_lpush_rate(redis_url, key, n) for _ in range(repeat)]
    raw = RawLimits(statistics.median(copies), statistics.median(inserts), statistics.median(pushes))
    say(f"  COPY {raw.copy_rows_s:,.0f} rows/s, multi-row INSERT {raw.insert_rows_s:,.0f} rows/s, "
        f"LPUSH {raw.lpush_ops_s:,.0f} ops/s")
    return raw


# --- 2 and 3. one 50,000-line batch, in process --------------------------------------------------------


@dataclass
class BatchFigures:
    lines: int
    insert_s: float
    claim_s: float
    submit_s: float
    steps: dict[str, float]
    file_mb: float
    provider_s: float  # submit → completed at the simulator (not ours)
    ingest_s: float
    ingest_steps: dict[str, float]
    succeeded: int
    ledger_rows: int

    @property
    def claim_build_upload_s(self) -> float:
        return self.claim_s + self.submit_s


def insert_waiting_tasks(dsn: str, n: int, provider: str, model: str) -> tuple[uuid.UUID, float]:
    tenant = uuid.uuid4()
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant, "bench"))
        started = time.perf_counter()
        copy_rows(conn, "tasks", waiting_rows(tenant, n, provider, model))
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute("ANALYZE tasks")
        conn.commit()
    return tenant, elapsed


def load_finished_tasks(dsn: str, n: int, provider: str, model: str) -> float:
    """COPY n finished (succeeded) batch tasks of another tenant, with their answers, so that the measured
    batch writes into a table of realistic size; then VACUUM ANALYZE, so that autovacuum does not start
    on them during the measurement. Returns the seconds it took."""
    tenant = uuid.uuid4()
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant, "bench-history"))
        separate = conn.execute("SELECT to_regclass('task_results') IS NOT NULL").fetchone()[0]  # type: ignore[index]
        request = label_request(0).replace("\\", "\\\\")
        body = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "model": model,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 61, "completion_tokens": 1, "total_tokens": 62}})
        task_head = (f"\t{tenant}\tclassification\tlight\tlight\trequested\tf\t{request}\t{{}}\tsucceeded\tbatch"
                     f"\t{provider}\t{model}\t1\t2026-01-01T00:00:00Z\t{model}")
        task_tail = "\t61\t1\t0.0000120\t0.0000240\t2026-01-01T00:00:00Z\t2026-01-01T01:00:00Z\t2026-01-01T01:00:00Z\n"
        task_columns = ("id", "tenant_id", "task_type", "requested_tier", "tier", "tier_reason", "urgent", "request",
                        "metadata", "status", "mode", "provider", "model", "attempts", "dispatched_at",
                        "served_model", *(() if separate else ("output", "response")), "input_tokens",
                        "output_tokens", "cost_usd", "baseline_cost_usd", "created_at", "updated_at", "finished_at")
        task_middle = "" if separate else f"\tbilling\t{body}"
        ids = new_task_ids(n)  # the product's ids: this month's partition, as the measured batch's
        with conn.transaction(), conn.cursor() as cursor:
            with cursor.copy(f"COPY tasks ({', '.join(task_columns)}) FROM STDIN") as copy:
                for start in range(0, n, 10_000):
                    copy.write("".join(f"{task_id}{task_head}{task_middle}{task_tail}"
                                       for task_id in ids[start:start + 10_000]))
            if separate:
                with cursor.copy("COPY task_results (task_id, output, response) FROM STDIN") as copy:
                    for start in range(0, n, 10_000):
                        copy.write("".join(f"{task_id}\tbilling\t{body}\n" for task_id in ids[start:start + 10_000]))
        conn.execute("VACUUM ANALYZE tasks")
        if separate:
            conn.execute("VACUUM ANALYZE task_results")
    return time.perf_counter() - started


def one_batch(ctx: WorkerContext, dsn: str, n: int, profile: bool, existing: int = 0) -> BatchFigures:
    light = ctx.config.tiers["light"]
    if existing:
        say(f"  {existing:,} finished tasks COPied (and vacuumed) in "
            f"{load_finished_tasks(dsn, existing, light.provider, light.model):.1f}s")
    _, insert_s = insert_waiting_tasks(dsn, n, light.provider, light.model)
    say(f"  {n:,} waiting_batch tasks COPied in {insert_s:.2f}s")

    with profiled(profile, "claim + submit_batch"):
        started = time.perf_counter()
        with ctx.sessions.begin() as session:
            claimed = worker_batch.claim_batch(session, ctx.config, light.provider, light.model)
        claim_s = time.perf_counter() - started
        if claimed is None or claimed.request_count != n:
            raise RuntimeError(f"claim_batch took {claimed.request_count if claimed else 0} tasks, expected {n}")

        clock = StepClock()
        with mock.patch.object(worker_batch, "write_batch_file", clock.wrap("build", worker_batch.write_batch_file)), \
                mock.patch.object(ProviderBatches, "upload_batch_file",
                                  clock.wrap("upload", ProviderBatches.upload_batch_file)), \
                mock.patch.object(ProviderBatches, "create_batch", clock.wrap("create", ProviderBatches.create_batch)):
            started = time.perf_counter()
            retry = worker_batch.submit_batch(ctx, claimed.id)
            submit_s = time.perf_counter() - started
    if retry is not None:
        raise RuntimeError(f"submit_batch asked to retry in {retry}s")
    submitted_at = time.perf_counter()
    with ctx.sessions.begin() as session:
        batch = session.get(ProviderBatch, claimed.id)
        assert batch is not None
        if batch.status is not BatchStatus.SUBMITTED:
            raise RuntimeError(f"batch is {batch.status}, not submitted")
        file_mb = batch.byte_size / MB
    steps = dict(clock.seconds)
    steps["other (locks, reads, records)"] = submit_s - sum(steps.values())
    say(f"  claim {claim_s:.2f}s, submit_batch {submit_s:.2f}s "
        f"({', '.join(f'{k} {v:.2f}s' for k, v in steps.items())}), file {file_mb:.1f} MB")

    deadline = time.monotonic() + 300
    while True:
        if claimed.id in worker_batch.poll_batches(ctx):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the simulator did not complete the batch within 300 s")
        time.sleep(0.1)
    provider_s = time.perf_counter() - submitted_at
    say(f"  simulator completed it {provider_s:.1f}s after submission; batch now ingesting")

    clock = StepClock()
    with profiled(profile, "ingest_batch"), \
            mock.patch.object(worker_batch, "classify_lines", clock.wrap("parse lines", worker_batch.classify_lines)), \
            mock.patch.object(worker_batch, "prepare_outcomes",
                              clock.wrap("price + build rows", worker_batch.prepare_outcomes)), \
            mock.patch.object(worker_batch, "write_prepared",
                              clock.wrap(WRITER_STEP, worker_batch.write_prepared)), \
            mock.patch.object(ProviderBatches, "iter_file_lines",
                              clock.wrap_iterator("download", ProviderBatches.iter_file_lines)):
        cpu_before = cpu_by_process()
        started = time.perf_counter()
        written = worker_batch.ingest_batch(ctx, claimed.id, lambda _batch, _delay: None)
        ingest_s = time.perf_counter() - started
        cpu = cpu_spent(cpu_before, cpu_by_process())
    ingest_steps = dict(clock.seconds)
    # the writer thread's time overlaps the reading thread's: "other" is what the reading thread spent
    # outside its timed steps, including waiting for the writer
    ingest_steps["other"] = ingest_s - sum(v for k, v in ingest_steps.items() if k != WRITER_STEP)
    with psycopg.connect(dsn) as conn:
        succeeded = int(conn.execute("SELECT count(*) FROM tasks WHERE status = 'succeeded' AND batch_id = %s",
                                     (claimed.id,)).fetchone()[0])  # type: ignore[index]
        ledger = int(conn.execute("SELECT count(*) FROM ledger_entries WHERE batch_id = %s",
                                  (claimed.id,)).fetchone()[0])  # type: ignore[index]
    say(f"  ingest_batch wrote {written:,} results in {ingest_s:.2f}s "
        f"({', '.join(f'{k} {v:.2f}s' for k, v in ingest_steps.items())}); "
        f"{succeeded:,} succeeded, {ledger:,} ledger rows")
    say(f"  CPU over the ingestion: {', '.join(f'{k} {v:.2f}s' for k, v in cpu.items())} "
        f"(of {ingest_s * (os.cpu_count() or 1):.2f} core-seconds)")
    return BatchFigures(n, insert_s, claim_s, submit_s, steps, file_mb, provider_s, ingest_s, ingest_steps,
                        succeeded, ledger)


# Columns the ingestion update writes that indexes of `tasks` name: while any index's key or predicate
# names one, the update cannot be HOT (each result then adds an entry to every index of the table)
INGESTION_WRITES_INDEXED = ("status", "finished_at")


def what_if_hot_ingestion(dsn: str, fillfactor: int) -> None:
    """`--what-if-hot`: make the scratch database's `tasks` what a schema with a HOT ingestion update would
    be, to measure what that redesign would buy before building it: every index whose key or predicate
    names a column in INGESTION_WRITES_INDEXED dropped, and `fillfactor` on every partition, so a task's
    claimed and finished versions fit on its page. Not a schema the product can run: the claim finds its
    tasks without their index (its time here is not the product's), and nothing else those indexes serve
    is measured."""
    names = "|".join(INGESTION_WRITES_INDEXED)
    with psycopg.connect(dsn, autocommit=True) as conn:
        dropped = [name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'tasks'::regclass AND pg_get_indexdef(i.indexrelid) ~ %s ORDER BY 1",
            (rf"\m({names})\M",)).fetchall()]
        for name in dropped:
            conn.execute(f'DROP INDEX "{name}"')
        partitions = [name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'tasks'::regclass ORDER BY 1").fetchall()]
        for name in partitions:
            conn.execute(f'ALTER TABLE "{name}" SET (fillfactor = {fillfactor})')
    say(f"what-if (not the product's schema): dropped {', '.join(dropped)}; fillfactor {fillfactor} on "
        f"{', '.join(partitions)}")


def hot_updates(dsn: str, expected_updates: int) -> tuple[int, int]:
    """(updates, of them HOT) of `tasks` in the scratch database, once the statistics count at least
    `expected_updates` (backends report theirs up to ~10 s after going idle) or 15 s have passed."""
    deadline = time.monotonic() + 15
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            updates, hot = conn.execute(
                "SELECT coalesce(sum(n_tup_upd), 0)::bigint, coalesce(sum(n_tup_hot_upd), 0)::bigint "
                "FROM pg_stat_user_tables WHERE relid IN (SELECT inhrelid FROM pg_inherits "
                "WHERE inhparent = 'tasks'::regclass)").fetchone() or (0, 0)
            if updates >= expected_updates or time.monotonic() > deadline:
                return int(updates), int(hot)
            time.sleep(0.25)


def repeated_batches(ctx: WorkerContext, dsn: str, args: argparse.Namespace) -> BatchFigures:
    """`--batch-runs` batches one after the other in the same database (the finished tasks loaded once),
    cycling through the combinations of `--ingest-writers` and `--ingest-chunk-lines`; the run of median
    ingestion time per combination is reported."""
    writer_counts = [int(w) for w in args.ingest_writers.split(",")] if args.ingest_writers else \
        [getattr(ctx.config.batch, "ingest_writers", 1)]  # a checkout from before the setting wrote with one
    chunk_sizes = [int(c) for c in args.ingest_chunk_lines.split(",")] if args.ingest_chunk_lines else \
        [ctx.config.batch.ingest_chunk_lines]
    variants = [(writers, chunk) for writers in writer_counts for chunk in chunk_sizes]
    varied = bool(args.ingest_writers or args.ingest_chunk_lines)
    runs: dict[tuple[int, int], list[BatchFigures]] = defaultdict(list)
    for run in range(args.batch_runs):
        writers, chunk = variants[run % len(variants)]
        if varied:
            update: dict[str, int] = {"ingest_chunk_lines": chunk}
            if args.ingest_writers:
                update["ingest_writers"] = writers
            ctx.config = ctx.config.model_copy(update={"batch": ctx.config.batch.model_copy(update=update)})
        if args.batch_runs > 1 or varied:
            say(f"batch run {run + 1} of {args.batch_runs}: {writers} ingest writer(s), chunks of {chunk:,} lines")
        runs[writers, chunk].append(one_batch(ctx, dsn, BATCH_LINES, args.profile,
                                              args.existing_tasks if run == 0 else 0))
    medians = {}
    for (writers, chunk), figures in runs.items():
        figures.sort(key=lambda f: f.ingest_s)
        medians[writers, chunk] = figures[len(figures) // 2]
        say(f"  {writers} writer(s), chunks of {chunk:,}: ingestion "
            + ", ".join(f"{f.lines / f.ingest_s:,.0f}" for f in figures)
            + f" lines/s; median {medians[writers, chunk].lines / medians[writers, chunk].ingest_s:,.0f} lines/s")
    # each task of a batch is updated twice: claimed (never HOT: `batch_id` is indexed), then its result
    claimed = BATCH_LINES * args.batch_runs
    updates, hot = hot_updates(dsn, 2 * claimed)
    say(f"  updates of tasks: {updates:,} ({claimed:,} claims), HOT: {hot:,}")
    return min(medians.values(), key=lambda f: f.ingest_s)


def in_process(base_url: str, redis_url: str, prefix: str, logs: Path, args: argparse.Namespace
               ) -> tuple[RawLimits, BatchFigures | None]:
    with scratch_database(base_url, prefix="tierbatch_bench") as database_url:
        upgrade_to_head(database_url)
        dsn = psycopg_dsn(database_url)
        if args.what_if_hot is not None:
            what_if_hot_ingestion(dsn, args.what_if_hot)
        raw = measure_raw_limits(dsn, redis_url, f"{prefix}raw-lpush", args.raw_rows, args.repeat)
        if args.skip_batch:
            return raw, None
        say(f"one {BATCH_LINES:,}-line batch, in process")
        port = free_port()
        config_path = bench_config(logs / "inprocess.toml", port)
        simulator = ManagedProcess(python_module("tierbatch.simulator", "--host", "127.0.0.1", "--port", str(port)),
                                   env={"PYTHONUNBUFFERED": "1"}, log_path=logs / "inprocess-simulator.log")
        ctx: WorkerContext | None = None
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/_sim/stats", proc=simulator)
            configure_simulator(f"http://127.0.0.1:{port}")
            ctx = worker_context(database_url, redis_url, config_path)
            return raw, repeated_batches(ctx, dsn, args)
        finally:
            if ctx is not None:
                ctx.providers.close()
                ctx.engine.dispose()
            simulator.stop()


# --- 4 and 5. end to end ------------------------------------------------------------------------------


@dataclass
class EndToEnd:
    label: str
    tasks: int
    via: str
    submit_s: float = 0.0
    done_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    api_rss_mb: float = 0.0
    worker_rss_mb: float = 0.0  # largest single worker process
    worker_tree_mb: float = 0.0
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    batches: list[tuple[int, float, float | None, float | None]] = field(default_factory=list)
    routed_s: float | None = None
    sim_stats: dict[str, Any] = field(default_factory=dict)
    worker_tasks: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # name → (n, total, max)
    started_epoch: float = 0.0
    error: str | None = None


def job_bodies(n: int, chunk: int, name: str) -> Iterator[dict[str, Any]]:
    for start in range(0, n, chunk):
        yield {"name": name, "task_type": "classification", "tier": "light", "urgent": False,
               "labels": list(LABELS), "system": SYSTEM_PROMPT, "template": "Ticket: {text}",
               "items": [{"id": f"t{i}", "text": TICKET.format(i=i)} for i in range(start, min(n, start + chunk))]}


def task_bodies(n: int) -> Iterator[dict[str, Any]]:
    for start in range(0, n, 1000):
        yield {"tasks": [{"prompt": f"{TICKET.format(i=i)}. Labels: {', '.join(LABELS)}",
                          "task_type": "classification", "tier": "light", "urgent": False}
                         for i in range(start, min(n, start + 1000))]}


def submit_all(client: httpx.Client, via: str, n: int, job_chunk: int) -> None:
    if via == "jobs":
        name = f"bench-{uuid.uuid4().hex[:8]}"
        for body in job_bodies(n, job_chunk, name):
            response = client.post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:300]}")
    else:
        for body in task_bodies(n):
            response = client.post("/v1/tasks", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST /v1/tasks answered {response.status_code}: {response.text[:300]}")


def status_counts(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> dict[str, int]:
    rows = conn.execute("SELECT status::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1",
                        (tenant,)).fetchall()
    return {str(status): int(count) for status, count in rows}


def end_to_end(base_url: str, redis_url: str, logs: Path, pool: str, concurrency: int,
               args: argparse.Namespace) -> EndToEnd:
    via = args.via
    result = EndToEnd(f"{pool} ×{concurrency}", args.tasks, via)
    say(f"end to end: {args.tasks:,} Light non-urgent tasks through POST /v1/{via}, worker --pool {pool} "
        f"--concurrency {concurrency}")
    with scratch_database(base_url, prefix="tierbatch_bench") as database_url:
        upgrade_to_head(database_url)
        dsn = psycopg_dsn(database_url)
        run_logs = logs / f"e2e-{pool}"
        run_logs.mkdir(parents=True, exist_ok=True)
        simulator_port = free_port()
        stack = Stack(tmp=run_logs, database_url=database_url, redis_url=redis_url,
                      config_path=bench_config(run_logs / "tierbatch.toml", simulator_port,
                                               args.test_reconciler),
                      simulator_port=simulator_port, api_port=free_port())
        try:
            stack.start_simulator()
            configure_simulator(stack.simulator_url)
            stack.start_api()
            worker = stack._start("worker", python_module("tierbatch.cli", "worker", "--concurrency", str(concurrency),
                                                          "--pool", pool))
            deadline = time.monotonic() + 60
            while "ready." not in worker.log_text():
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{worker.log_text()}")
                time.sleep(0.1)
            stack.start_beat()
            api_key = stack.new_tenant_key("bench")
            with psycopg.connect(dsn, autocommit=True) as conn:
                tenant = uuid.UUID(str(conn.execute("SELECT id FROM tenants").fetchone()[0]))  # type: ignore[index]
                _run_and_watch(stack, conn, tenant, api_key, result, args)
                _collect_timeline(conn, tenant, result)
            result.sim_stats = stack.sim("GET", "/_sim/stats")
        except Exception as exc:  # report what was measured; the table says what went wrong
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"  ERROR: {result.error}")
        finally:
            stack.stop_all()
            result.worker_tasks = celery_task_times(run_logs)
            removed = delete_redis_keys(redis_url, stack.redis_prefix)
            say(f"  stopped the stack; deleted {removed} Redis keys under {stack.redis_prefix}")
    return result


def _run_and_watch(stack: Stack, conn: psycopg.Connection[Any], tenant: uuid.UUID, api_key: str,
                   result: EndToEnd, args: argparse.Namespace) -> None:
    api, worker = stack.processes["api"], stack.processes["worker"]
    submit_error: list[BaseException] = []
    submitted = threading.Event()

    def submit() -> None:
        try:
            with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key}"},
                              timeout=600) as client:
                submit_all(client, args.via, args.tasks, args.job_chunk)
            result.submit_s = time.perf_counter() - started
        except BaseException as exc:
            submit_error.append(exc)
        finally:
            submitted.set()

    with RssSampler({"api": api.pid, "worker": worker.pid}) as sampler:
        result.timeline.append((0.0, {}))
        started = time.perf_counter()
        result.started_epoch = time.time()
        thread = threading.Thread(target=submit, name="submit", daemon=True)
        thread.start()
        last_print = 0.0
        while True:
            time.sleep(0.25)
            elapsed = time.perf_counter() - started
            counts = status_counts(conn, tenant)
            result.timeline.append((elapsed, counts))
            result.counts = counts
            terminal = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            if submit_error:
                raise RuntimeError(f"submission failed: {submit_error[0]}")
            if submitted.is_set() and terminal >= args.tasks:
                result.done_s = elapsed
                break
            if elapsed - last_print >= 5:
                last_print = elapsed
                say(f"  {elapsed:5.1f}s  " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
            if elapsed > args.e2e_timeout:
                raise TimeoutError(f"not all {args.tasks:,} tasks terminal after {args.e2e_timeout:.0f}s: {counts}")
        thread.join(timeout=5)
    result.api_rss_mb = sampler.peaks["api"].process / MB
    result.worker_rss_mb = sampler.peaks["worker"].process / MB
    result.worker_tree_mb = sampler.peaks["worker"].tree / MB
    say(f"  submitted in {result.submit_s:.1f}s, all terminal after {result.done_s:.1f}s: {result.counts}")


def _collect_timeline(conn: psycopg.Connection[Any], tenant: uuid.UUID, result: EndToEnd) -> None:
    start = result.started_epoch
    row = conn.execute("SELECT extract(epoch FROM max(dispatched_at)) FROM tasks WHERE tenant_id = %s",
                       (tenant,)).fetchone()
    if row and row[0] is not None:
        result.routed_s = float(row[0]) - start
    rows = conn.execute(
        "SELECT request_count, extract(epoch FROM created_at), extract(epoch FROM submitted_at), "
        "       extract(epoch FROM finished_at) FROM provider_batches ORDER BY created_at").fetchall()
    for count, created, submitted, finished in rows:
        result.batches.append((int(count), float(created) - start,
                               float(submitted) - start if submitted is not None else None,
                               float(finished) - start if finished is not None else None))


def celery_task_times(run_logs: Path) -> dict[str, tuple[int, float, float]]:
    """Per Celery task name, from the worker's log: (runs, seconds in total, longest run)."""
    times: dict[str, list[float]] = defaultdict(list)
    for log in run_logs.glob("worker-*.log"):
        for match in TASK_LOG.finditer(log.read_text(errors="replace")):
            times[match.group(1)].append(float(match.group(2)))
    return {name: (len(v), sum(v), max(v)) for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))}


def print_task_times(console: Any, title: str, worker_tasks: dict[str, tuple[int, float, float]]) -> None:
    """`celery_task_times` as a table: runs, seconds in total and longest run per Celery task."""
    from rich.table import Table

    tasks = Table(title=title)
    for column in ("task", "runs", "seconds", "longest"):
        tasks.add_column(column, justify="right" if column != "task" else "left")
    for name, (count, total, longest) in worker_tasks.items():
        tasks.add_row(name, f"{count:,}", f"{total:.1f}", f"{longest:.2f}")
    console.print(tasks)


# --- report -------------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "[yellow]n/a[/yellow]"
    return "[green]meets[/green]" if ok else "[bold red]MISSES[/bold red]"


def report(raw: RawLimits, batch: BatchFigures | None, runs: list[EndToEnd]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, shutil.get_terminal_size((150, 40)).columns))
    table = Table(title="tierbatch batch path — targets", show_lines=True)
    for column in ("probe", "figure", "raw limit (same run)", "ratio", "§13 target", ""):
        table.add_column(column, overflow="fold")
    table.add_row("Postgres COPY, task-like rows, scratch table", f"{raw.copy_rows_s:,.0f} rows/s", "—", "—",
                  f"reference ~{REFERENCE['copy']:,.0f} rows/s", "")
    table.add_row("Postgres pipelined multi-row INSERT (500 rows/stmt)", f"{raw.insert_rows_s:,.0f} rows/s", "—",
                  "—", f"reference ~{REFERENCE['insert']:,.0f} rows/s", "")
    table.add_row("Redis pipelined LPUSH (~1 KB values)", f"{raw.lpush_ops_s:,.0f} ops/s", "—", "—",
                  f"reference ~{REFERENCE['lpush']:,.0f} ops/s", "")
    if batch is not None:
        copy_time = batch.lines / raw.copy_rows_s
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in batch.steps.items())
        table.add_row(f"claim + build + upload + create, {batch.lines:,}-line batch",
                      f"{batch.claim_build_upload_s:.2f} s\nclaim {batch.claim_s:.2f}s, {steps}; "
                      f"file {batch.file_mb:.1f} MB",
                      f"COPY of {batch.lines:,} rows: {copy_time:.2f} s",
                      f"{batch.claim_build_upload_s / copy_time:.1f}× COPY", f"≤ {TARGET_SUBMIT_SECONDS:.0f} s",
                      verdict(batch.claim_build_upload_s <= TARGET_SUBMIT_SECONDS))
        rate = batch.lines / batch.ingest_s
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in batch.ingest_steps.items())
        table.add_row(f"output ingestion, {batch.lines:,} lines (results + ledger rows)",
                      f"{rate:,.0f} lines/s\n{batch.ingest_s:.2f} s: {steps}",
                      f"COPY {raw.copy_rows_s:,.0f} rows/s, multi-row INSERT {raw.insert_rows_s:,.0f} rows/s",
                      f"{rate / raw.copy_rows_s:.0%} of COPY", f"≥ {TARGET_INGEST_RATE:,.0f} lines/s",
                      verdict(rate >= TARGET_INGEST_RATE))
    for run in runs:
        copy_time = run.tasks / raw.copy_rows_s
        done = f"{run.done_s:.1f} s" if run.done_s is not None else f"not done ({run.error})"
        detail = (f"submit {run.submit_s:.1f}s ({run.tasks / run.submit_s:,.0f} tasks/s)" if run.submit_s else "")
        if run.routed_s is not None:
            detail += f"; all routed at {run.routed_s:.1f}s"
        if run.batches:
            last = max((b[3] or 0.0) for b in run.batches)
            detail += f"; {len(run.batches)} batches, last finished at {last:.1f}s"
        table.add_row(f"end to end, {run.tasks:,} Light tasks via /v1/{run.via}, worker {run.label}",
                      f"{done}\n{detail}\n{run.counts}", f"COPY of {run.tasks:,} rows: {copy_time:.2f} s",
                      f"{run.done_s / copy_time:.0f}× COPY" if run.done_s else "—",
                      f"≤ {TARGET_E2E_SECONDS:.0f} s",
                      verdict(run.done_s is not None and run.done_s <= TARGET_E2E_SECONDS))
        table.add_row(f"peak RSS during that run ({run.label})",
                      f"API {run.api_rss_mb:,.0f} MB\nworker {run.worker_rss_mb:,.0f} MB "
                      f"(largest process; tree {run.worker_tree_mb:,.0f} MB)", "—", "—",
                      f"< {TARGET_RSS_MB:.0f} MB per process",
                      verdict(max(run.api_rss_mb, run.worker_rss_mb) < TARGET_RSS_MB if run.api_rss_mb else None))
    console.print(table)
    for run in runs:
        if run.batches:
            batches = Table(title=f"provider batches, worker {run.label} (seconds after the first POST)")
            for column in ("lines", "claimed", "submitted", "finished"):
                batches.add_column(column, justify="right")
            shown = run.batches if len(run.batches) <= 24 else run.batches[:12] + run.batches[-12:]
            for count, created, submitted, finished in shown:
                batches.add_row(f"{count:,}", f"{created:.1f}", f"{submitted:.1f}" if submitted is not None else "—",
                                f"{finished:.1f}" if finished is not None else "—")
            console.print(batches)
        if run.worker_tasks:
            print_task_times(console, f"worker time by Celery task, {run.label} (from the worker log)",
                             run.worker_tasks)
        if run.sim_stats:
            lines = run.sim_stats.get("batch_lines")
            console.print(f"simulator ({run.label}): {run.sim_stats.get('batches_created')} batches, {lines:,} lines "
                          f"submitted for {run.tasks:,} tasks" + ("" if lines == run.tasks else "  [red]≠[/red]"))


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks of the end-to-end run")
    parser.add_argument("--skip-e2e", action="store_true", help="only the raw limits and the 50,000-line batch")
    parser.add_argument("--skip-batch", action="store_true", help="skip the in-process 50,000-line batch")
    parser.add_argument("--pool", choices=("prefork", "threads", "both"), default="prefork",
                        help="worker pool of the end-to-end run (prefork ×2 is the production default; "
                             "threads runs ×4)")
    parser.add_argument("--via", choices=("jobs", "tasks"),
                        default="jobs" if (REPO_ROOT / "api" / "routes" / "jobs.py").exists() else "tasks",
                        help="submit through POST /v1/jobs (one request per --job-chunk items) or POST /v1/tasks "
                             "(requests of 1,000)")
    parser.add_argument("--job-chunk", type=int, default=100_000, help="items per POST /v1/jobs request")
    parser.add_argument("--e2e-timeout", type=float, default=240.0)
    parser.add_argument("--raw-rows", type=int, default=100_000, help="rows / ops per raw-limit probe")
    parser.add_argument("--repeat", type=int, default=3, help="runs per raw-limit probe (median)")
    parser.add_argument("--test-reconciler", action="store_true",
                        help="keep the integration tests' reconciler (1 s interval, 3 s stale) in the end-to-end run")
    parser.add_argument("--profile", action="store_true", help="cProfile claim/submit and ingestion")
    parser.add_argument("--batch-runs", type=int, default=1, metavar="N",
                        help="measure N 50,000-line batches in the same database (median reported)")
    parser.add_argument("--ingest-writers", metavar="LIST",
                        help="[batch] ingest_writers for the batch runs, cycled through (e.g. 1,2); default: config")
    parser.add_argument("--ingest-chunk-lines", metavar="LIST",
                        help="[batch] ingest_chunk_lines for the batch runs, cycled through with the writer counts "
                             "(e.g. 10000,5000); default: config")
    parser.add_argument("--existing-tasks", type=int, default=0, metavar="N",
                        help="COPY N finished tasks into the scratch database before the 50,000-line batch")
    parser.add_argument("--what-if-hot", type=int, metavar="FILLFACTOR",
                        help="measure a schema where ingestion's update can be HOT: drop the scratch database's "
                             "tasks indexes naming status or finished_at, set FILLFACTOR on its partitions "
                             "(the claim then runs without its index)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.what_if_hot is not None and not 10 <= args.what_if_hot <= 100:
        parser.error("--what-if-hot: a fillfactor from 10 to 100")
    runs: list[EndToEnd] = []
    with run_place(args, "bench") as place:
        raw, batch = in_process(args.database_url, args.redis_url, place.redis_prefix, place.logs, args)
        if not args.skip_e2e:
            pools = ["prefork", "threads"] if args.pool == "both" else [args.pool]
            for pool in pools:
                runs.append(end_to_end(args.database_url, args.redis_url, place.logs, pool,
                                       2 if pool == "prefork" else 4, args))
        place.failed = any(run.error for run in runs)
    say("")
    report(raw, batch, runs)


if __name__ == "__main__":
    main()
