"""A million-item job end to end, each phase beside the raw limit measured in the same run.

    .venv/bin/python bench/million.py                            # 1,000,000 items in one NDJSON request
    .venv/bin/python bench/million.py --via cli                  # the same file through `tierbatch submit`
    .venv/bin/python bench/million.py --tasks 100000 --worker-processes 1,2,4 --immediate-tasks 3000
                                                                 # scale-out: both paths per worker count

Targets: every task `succeeded` within 4 minutes of the first byte sent, every process (API, each worker
process, beat, simulator, the CLI) under 500 MB resident, the results streamed out.

For each worker count: a scratch database migrated to head; simulator (batch durations 0.05 s), API,
`tierbatch worker --concurrency N --pool prefork` (N worker processes) and beat, with the tests' config
but production-sized batches (bench/batch_path.py's `bench_config`). Then:

1. the items go in as one streamed NDJSON `POST /v1/jobs` (the job's fields on the first line), from this
   process (`--via ndjson`) or from `tierbatch submit FILE --no-wait` on a file written beforehand
   (`--via cli`, whose resident memory is measured too);
2. the run is watched until no task of the tenant is live (`provider_batches` every 0.5 s; the tenant's
   live tasks counted once the batches are all done, or every 30 s);
3. the results are downloaded, streamed, through `GET /v1/jobs/{id}/results`;
4. with `--immediate-tasks M`: M urgent Light tasks (one JSON job) against the simulator at zero latency,
   timed until all succeeded.

Phases come from the `provider_batches` timestamps and the worker's log: upload (items/s beside COPY into a
copy of `tasks` with its indexes), batch building (claim to submitted, per batch), the simulator's
turnaround (submitted to completed, which includes the poll interval), output ingestion (lines/s over the
worker's time in ingestion, beside COPY), and the download (beside `COPY (SELECT …) TO STDOUT` of the same
rows). Resident memory: the peak of each process (sampled every 0.2 s and its VmHWM read before it stops).
CPU: seconds per process group over each run, to say where it saturates.

Every process is stopped, every scratch database dropped, every Redis key of the run deleted. Prints
figures; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    LABELS,
    SYSTEM_PROMPT,
    TICKET,
    add_run_arguments,
    copy_rate,
    delete_redis_keys,
    insert_rate,
    redis_lpush_rate,
    run_place,
)
from bench.batch_path import SIM_FAST, bench_config, celery_task_times, print_task_times, say
from bench.ingest import copy_rate as copy_rate_into_tasks
from tests.support.procs import REPO_ROOT, free_port, python_module
from tests.support.stack import Stack, psycopg_dsn, scratch_database
from tierbatch.base.states import LIVE_TASK_STATUSES
from tierbatch.migrations.runner import upgrade_to_head

TARGET_SECONDS = 240.0
TARGET_RSS_MB = 500.0
MB = 1024 * 1024
_SIM_BATCH: Any = SIM_FAST["batch"]
SIM_DURATIONS = sum(float(_SIM_BATCH[k]) for k in ("validating_seconds", "in_progress_seconds", "finalizing_seconds"))
ZERO_LATENCY = {"models": {"*": {"latency_ms": [0, 0], "error_rate": 0.0}}}
LIVE = tuple(s.value for s in LIVE_TASK_STATUSES)
JOB_FIELDS = {"task_type": "classification", "tier": "light", "urgent": False, "labels": list(LABELS),
              "system": SYSTEM_PROMPT, "template": "Ticket: {text}"}


# --- raw limits -------------------------------------------------------------------------------------------


@dataclass
class RawLimits:
    copy_rows_s: float = 0.0  # COPY into a table shaped like tasks, no indexes
    copy_tasks_rows_s: float = 0.0  # COPY into a copy of tasks with all its indexes
    insert_rows_s: float = 0.0
    lpush_ops_s: float = 0.0


def measure_raw_limits(base_url: str, redis_url: str, prefix: str, rows: int) -> RawLimits:
    say(f"raw limits: {rows:,} rows / ops each")
    with scratch_database(base_url, prefix="tierbatch_bench") as database_url:
        upgrade_to_head(database_url)
        dsn = psycopg_dsn(database_url)
        raw = RawLimits(copy_rate(dsn, rows), copy_rate_into_tasks(dsn, rows, with_indexes=True),
                        insert_rate(dsn, rows), redis_lpush_rate(redis_url, f"{prefix}raw-lpush", rows))
    say(f"  COPY {raw.copy_rows_s:,.0f} rows/s (into tasks with its indexes {raw.copy_tasks_rows_s:,.0f}), "
        f"multi-row INSERT {raw.insert_rows_s:,.0f} rows/s, LPUSH {raw.lpush_ops_s:,.0f} ops/s")
    return raw


# --- processes: resident memory and CPU -------------------------------------------------------------------


class ProcessWatch:
    """Samples resident memory and CPU time of named process trees and of the database's backends."""

    def __init__(self, database: str, interval: float = 0.2) -> None:
        self.database = database
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.peak_mb: dict[str, float] = defaultdict(float)  # role → largest single process
        self.cpu: dict[int, tuple[str, float]] = {}  # pid → (role, user + system seconds, last seen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)

    def add(self, role: str, pid: int) -> None:
        with self._lock:
            self.roots[role] = pid

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def processes(self) -> Iterator[tuple[str, psutil.Process]]:
        with self._lock:
            roots = dict(self.roots)
        for role, pid in roots.items():
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in tree:
                yield role, proc
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if proc.info.get("name") == "postgres" and f" {self.database} " in cmdline:
                yield "postgres", proc

    def sample(self) -> None:
        for role, proc in self.processes():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    hwm = _vm_hwm(proc.pid) if role != "postgres" else 0
            except psutil.Error:
                continue
            if role != "postgres":
                self.peak_mb[role] = max(self.peak_mb[role], max(rss, hwm) / MB)
            self.cpu[proc.pid] = (role, times.user + times.system)

    def cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for role, seconds in self.cpu.values():
            totals[role] += seconds
        return dict(totals)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def _vm_hwm(pid: int) -> int:
    """The process's peak resident set (bytes) as the kernel kept it: no sample can miss it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- one run ----------------------------------------------------------------------------------------------


@dataclass
class BatchRun:
    workers: int
    tasks: int
    via: str
    submit_s: float = 0.0
    done_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    batches: list[tuple[int, float, float | None, float | None, float | None]] = field(default_factory=list)
    worker_tasks: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    download_s: float = 0.0
    download_lines: int = 0
    download_mb: float = 0.0
    raw_download_s: float = 0.0
    peak_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ImmediateRun:
    workers: int
    tasks: int
    done_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def ndjson_body(n: int, name: str) -> Iterator[bytes]:
    """The job's fields, then n items, handed over in pieces of 2,000 lines."""
    yield json.dumps({"name": name, **JOB_FIELDS}).encode() + b"\n"
    for start in range(0, n, 2000):
        yield "".join(json.dumps({"id": f"t{i}", "text": TICKET.format(i=i)}) + "\n"
                      for i in range(start, min(n, start + 2000))).encode()


def write_items_file(path: Path, n: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"t{i}", "text": TICKET.format(i=i)}) + "\n")


def live_count(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*) FROM tasks WHERE tenant_id = %s AND status = ANY(%s::task_status[])",
                       (tenant, list(LIVE))).fetchone()
    return int(row[0]) if row else 0


def status_counts(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> dict[str, int]:
    rows = conn.execute("SELECT status::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1",
                        (tenant,)).fetchall()
    return {str(status): int(count) for status, count in rows}


def batches_settled(conn: psycopg.Connection[Any], tasks: int) -> bool:
    """Every provider batch is done or failed and they held at least `tasks` lines (a tiny table: cheap)."""
    row = conn.execute("SELECT count(*) FILTER (WHERE status NOT IN ('done', 'failed')), "
                       "coalesce(sum(request_count), 0) FROM provider_batches").fetchone()
    return row is not None and int(row[0]) == 0 and int(row[1]) >= tasks


def batch_progress(conn: psycopg.Connection[Any]) -> str:
    rows = conn.execute("SELECT status::text, count(*), coalesce(sum(request_count), 0) FROM provider_batches "
                        "GROUP BY 1 ORDER BY 1").fetchall()
    return ", ".join(f"{status} {n} ({lines:,} lines)" for status, n, lines in rows) or "no batches yet"


@contextlib.contextmanager
def running_stack(base_url: str, redis_url: str, logs: Path, workers: int, label: str
                  ) -> Iterator[tuple[Stack, str, uuid.UUID, str]]:
    """Simulator, API, worker (N processes) and beat on a scratch database; (stack, key, tenant, database)."""
    with scratch_database(base_url, prefix="tierbatch_bench") as database_url:
        upgrade_to_head(database_url)
        run_logs = logs / label
        run_logs.mkdir(parents=True, exist_ok=True)
        simulator_port = free_port()
        stack = Stack(tmp=run_logs, database_url=database_url, redis_url=redis_url,
                      config_path=bench_config(run_logs / "tierbatch.toml", simulator_port),
                      simulator_port=simulator_port, api_port=free_port())
        try:
            stack.start_simulator()
            stack.sim("POST", "/_sim/config", SIM_FAST)
            stack.start_api()
            worker = stack._start("worker", python_module("tierbatch.cli", "worker", "--concurrency", str(workers),
                                                          "--pool", "prefork"))
            deadline = time.monotonic() + 60
            while "ready." not in worker.log_text():
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{worker.log_text()}")
                time.sleep(0.1)
            stack.start_beat()
            tenant_id, key = stack.new_tenant("bench")
            yield stack, key, uuid.UUID(tenant_id), database_url.rsplit("/", 1)[-1]
        finally:
            stack.stop_all()
            removed = delete_redis_keys(redis_url, stack.redis_prefix)
            say(f"  stopped the stack; deleted {removed} Redis keys under {stack.redis_prefix}")


def watch_processes(stack: Stack, database: str) -> ProcessWatch:
    watch = ProcessWatch(database)
    for role in ("api", "worker", "beat", "simulator"):
        watch.add(role, stack.processes[role].pid)
    return watch


def batch_run(base_url: str, redis_url: str, logs: Path, workers: int, args: argparse.Namespace,
              immediate: int) -> tuple[BatchRun, ImmediateRun | None]:
    result = BatchRun(workers, args.tasks, args.via)
    fast: ImmediateRun | None = None
    label = f"workers-{workers}"
    say(f"\n{args.tasks:,} Light items as one NDJSON job via {args.via}, {workers} worker process(es)")
    items_file = logs / "items.jsonl"
    if args.via == "cli" and not items_file.exists():
        write_items_file(items_file, args.tasks)  # before the clock starts
    try:
        with running_stack(base_url, redis_url, logs, workers, label) as (stack, key, tenant, database):
            dsn = psycopg_dsn(stack.database_url)
            with psycopg.connect(dsn, autocommit=True) as conn:
                watch = watch_processes(stack, database)
                with watch:
                    started_epoch = time.time()
                    job_id = _submit_and_wait(stack, key, tenant, conn, watch, result, args, items_file)
                    result.batches = batch_timeline(conn, started_epoch)
                    _download(stack, key, job_id, conn, result)
                    watch.sample()
                result.peak_mb = dict(watch.peak_mb)
                result.cpu_s = watch.cpu_by_role()
                result.worker_tasks = celery_task_times(logs / label)
                if immediate:
                    fast = immediate_run(stack, conn, database, workers, immediate)
    except Exception as exc:  # report what was measured; the table says what went wrong
        result.error = f"{type(exc).__name__}: {exc}"
        say(f"  ERROR: {result.error}")
        result.worker_tasks = celery_task_times(logs / label)
    return result, fast


def _submit_and_wait(stack: Stack, key: str, tenant: uuid.UUID, conn: psycopg.Connection[Any], watch: ProcessWatch,
                     result: BatchRun, args: argparse.Namespace, items_file: Path) -> str:
    name = f"million-{uuid.uuid4().hex[:8]}"
    answer: dict[str, Any] = {}
    failure: list[BaseException] = []
    submitted = threading.Event()
    started = time.perf_counter()

    def submit() -> None:
        try:
            if args.via == "cli":
                answer.update(_submit_with_cli(stack, key, name, items_file, watch))
            else:
                with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                                  timeout=900) as client:
                    response = client.post("/v1/jobs", content=ndjson_body(args.tasks, name),
                                           headers={"Content-Type": "application/x-ndjson"})
                    if response.status_code != 202:
                        raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:300]}")
                    answer.update(response.json())
            result.submit_s = time.perf_counter() - started
            say(f"  stored {args.tasks:,} items in {result.submit_s:.1f}s "
                f"({args.tasks / result.submit_s:,.0f} items/s): {answer.get('counts')}")
        except BaseException as exc:
            failure.append(exc)
        finally:
            submitted.set()

    thread = threading.Thread(target=submit, name="submit", daemon=True)
    thread.start()
    last_live, last_print = time.perf_counter(), 0.0
    while True:
        time.sleep(0.5)
        elapsed = time.perf_counter() - started
        if failure:
            raise RuntimeError(f"submission failed: {failure[0]}")
        # counting a million live tasks takes a second of a core: only once the batches say they are done
        # (or every 30 s, for tasks that never reached a batch)
        if submitted.is_set() and (batches_settled(conn, args.tasks) or time.perf_counter() - last_live >= 30):
            last_live = time.perf_counter()
            if live_count(conn, tenant) == 0:
                result.done_s = time.perf_counter() - started
                break
        if elapsed - last_print >= 10:
            last_print = elapsed
            say(f"  {elapsed:5.1f}s  {batch_progress(conn)}")
        if elapsed > args.timeout:
            raise TimeoutError(f"tasks still live after {args.timeout:.0f}s: {status_counts(conn, tenant)}")
    thread.join(timeout=5)
    result.counts = status_counts(conn, tenant)
    say(f"  nothing live after {result.done_s:.1f}s: {result.counts}")
    return str(answer["id"])


def _submit_with_cli(stack: Stack, key: str, name: str, items_file: Path, watch: ProcessWatch) -> dict[str, Any]:
    env = {**os.environ, **stack.env, "TIERBATCH_API_URL": stack.api_url, "TIERBATCH_API_KEY": key}
    command = [sys.executable, "-m", "tierbatch.cli", "submit", str(items_file), "--name", name, "--tier", "light",
               "--labels", ",".join(LABELS), "--system", SYSTEM_PROMPT, "--template", "Ticket: {text}",
               "--no-wait", "--json"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watch.add("cli", proc.pid)
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"tierbatch submit exited {proc.returncode}: {err[-500:]}")
    job: dict[str, Any] = json.loads(out)
    return job


def batch_timeline(conn: psycopg.Connection[Any], start: float
                   ) -> list[tuple[int, float, float | None, float | None, float | None]]:
    """Per provider batch: lines, then claimed, submitted, completed, ingested, as seconds after the start."""
    rows = conn.execute(
        "SELECT request_count, extract(epoch FROM created_at), extract(epoch FROM submitted_at),"
        "       extract(epoch FROM completed_at), extract(epoch FROM ingested_at) "
        "FROM provider_batches ORDER BY created_at").fetchall()
    def after(moment: Any) -> float | None:
        return float(moment) - start if moment is not None else None

    return [(int(n), float(c) - start, after(s), after(d), after(i)) for n, c, s, d, i in rows]


def _download(stack: Stack, key: str, job_id: str, conn: psycopg.Connection[Any], result: BatchRun) -> None:
    started = time.perf_counter()
    size = 0
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=900) as client, \
            client.stream("GET", f"/v1/jobs/{job_id}/results") as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
            result.download_lines += chunk.count(b"\n")
    result.download_s = time.perf_counter() - started
    result.download_mb = size / MB
    # the raw limit: the same rows, in the same order, straight out of Postgres
    started = time.perf_counter()
    with conn.cursor() as cursor, cursor.copy(
            "COPY (SELECT item_id, id, status, output, served_model, cost_usd, error FROM tasks "
            "WHERE job_id = %s ORDER BY id) TO STDOUT", (job_id,)) as copy:
        for _ in copy:
            pass
    result.raw_download_s = time.perf_counter() - started
    say(f"  results: {result.download_lines:,} lines ({result.download_mb:,.0f} MB) in {result.download_s:.1f}s; "
        f"COPY of the same rows {result.raw_download_s:.1f}s")


def immediate_run(stack: Stack, conn: psycopg.Connection[Any], database: str, workers: int, n: int) -> ImmediateRun:
    """n urgent Light tasks (one JSON job) against the simulator at zero latency, on the same stack."""
    result = ImmediateRun(workers, n)
    say(f"  immediate path: {n:,} urgent tasks, simulator at zero latency")
    stack.sim("POST", "/_sim/config", ZERO_LATENCY)
    tenant_id, key = stack.new_tenant("immediate")
    tenant = uuid.UUID(tenant_id)
    body = {**JOB_FIELDS, "urgent": True, "items": [{"id": f"u{i}", "text": TICKET.format(i=i)} for i in range(n)]}
    watch = watch_processes(stack, database)
    try:
        with watch:
            watch.sample()
            before = watch.cpu_by_role()
            started = time.perf_counter()
            with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                              timeout=300) as client:
                client.post("/v1/jobs", json=body).raise_for_status()
            while True:
                time.sleep(0.25)
                if live_count(conn, tenant) == 0:
                    result.done_s = time.perf_counter() - started
                    break
                if time.perf_counter() - started > 300:
                    raise TimeoutError(f"immediate tasks still live after 300s: {status_counts(conn, tenant)}")
            watch.sample()
            after = watch.cpu_by_role()
        result.cpu_s = {role: after[role] - before.get(role, 0.0) for role in after}
        result.counts = status_counts(conn, tenant)
        say(f"  immediate: {n:,} in {result.done_s:.1f}s = {n / result.done_s:,.0f} tasks/s: {result.counts}")
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        say(f"  ERROR: {result.error}")
    return result


# --- report -----------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "[yellow]n/a[/yellow]"
    return "[green]meets[/green]" if ok else "[bold red]MISSES[/bold red]"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def cores(cpu_s: dict[str, float], wall: float) -> str:
    return ", ".join(f"{role} {seconds:,.0f} s ({seconds / wall:.2f} cores)"
                     for role, seconds in sorted(cpu_s.items(), key=lambda kv: -kv[1]))


def report(raw: RawLimits, runs: list[BatchRun], fast: list[ImmediateRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    table = Table(title="tierbatch: a large job end to end (measured under load unless said otherwise)",
                  show_lines=True)
    for column in ("phase", "figure", "raw limit (same run)", "ratio", "target", ""):
        table.add_column(column, overflow="fold")
    for run in runs:
        who = f"{run.tasks:,} items via {run.via}, {run.workers} worker process(es)"
        if run.error and run.done_s is None:
            table.add_row(who, f"not done: {run.error}", "", "", "", verdict(False))
        if run.submit_s:
            rate = run.tasks / run.submit_s
            table.add_row(f"{who}: upload (parse, check, COPY, commit)", f"{run.submit_s:.1f} s = {rate:,.0f} items/s",
                          f"COPY into tasks with its indexes {raw.copy_tasks_rows_s:,.0f} rows/s; "
                          f"without {raw.copy_rows_s:,.0f} rows/s",
                          f"{rate / raw.copy_tasks_rows_s:.0%} of COPY into tasks", "", "")
        if run.batches:
            lines = [b[0] for b in run.batches]
            build = [b[2] - b[1] for b in run.batches if b[2] is not None]
            turnaround = [b[3] - b[2] for b in run.batches if b[3] is not None and b[2] is not None]
            ingest_wall = [b[4] - b[3] for b in run.batches if b[4] is not None and b[3] is not None]
            per_batch = _median([float(n) for n in lines])
            build_median = _median(build)
            table.add_row(f"{who}: batches", f"{len(lines)} batches, median {per_batch:,.0f} lines; claimed "
                          f"{run.batches[0][1]:.1f}–{run.batches[-1][1]:.1f} s after the first byte", "", "", "", "")
            claim = run.worker_tasks.get("tierbatch.batch.assemble")
            submit = run.worker_tasks.get("tierbatch.batch.submit")
            if submit:
                mean = submit[1] / submit[0]
                claimed = f"claiming {claim[1] / len(lines):.2f} s per batch (assembly's time); " if claim else ""
                table.add_row("  batch building (worker time: claim, then JSONL + upload + create)",
                              f"{claimed}building {mean:.2f} s per batch ({submit[1]:.1f} s over {submit[0]} "
                              f"runs); claimed → submitted median {build_median:.1f} s with the queueing",
                              f"COPY of {per_batch:,.0f} rows {per_batch / raw.copy_rows_s:.2f} s",
                              f"{mean / (per_batch / raw.copy_rows_s):.1f}× COPY", "", "")
            table.add_row("  simulator turnaround (submitted → completed, with the poll interval)",
                          f"median {_median(turnaround):.2f} s, longest {max(turnaround, default=0):.2f} s",
                          f"configured durations {SIM_DURATIONS:.2f} s + poll every 0.5 s", "", "", "")
            ingest = run.worker_tasks.get("tierbatch.batch.ingest")
            if ingest:
                busy = ingest[1]
                rate = sum(lines) / busy
                table.add_row("  output ingestion (worker time in tierbatch.batch.ingest)",
                              f"{rate:,.0f} lines/s of ingestion time ({busy:.1f} s over {ingest[0]} runs); "
                              f"completed → ingested median {_median(ingest_wall):.1f} s",
                              f"COPY {raw.copy_rows_s:,.0f} rows/s", f"{rate / raw.copy_rows_s:.0%} of COPY", "", "")
        if run.done_s is not None:
            table.add_row(f"{who}: all done (nothing live)", f"{run.done_s:.1f} s\n{run.counts}",
                          f"COPY of {run.tasks:,} rows {run.tasks / raw.copy_tasks_rows_s:.1f} s",
                          f"{run.done_s / (run.tasks / raw.copy_tasks_rows_s):.0f}× COPY",
                          f"≤ {TARGET_SECONDS:.0f} s", verdict(run.done_s <= TARGET_SECONDS
                                                              and run.counts.get("succeeded") == run.tasks))
        if run.download_s:
            table.add_row("  results download (streamed JSONL)",
                          f"{run.download_lines:,} lines, {run.download_mb:,.0f} MB in {run.download_s:.1f} s = "
                          f"{run.download_lines / run.download_s:,.0f} lines/s",
                          f"COPY (SELECT …) TO STDOUT of the same rows {run.raw_download_s:.1f} s",
                          f"{run.download_s / run.raw_download_s:.1f}× COPY", "", "")
        if run.peak_mb:
            worst = max(run.peak_mb.values())
            table.add_row("  peak resident memory, largest single process of each",
                          ", ".join(f"{role} {mb:,.0f} MB" for role, mb in sorted(run.peak_mb.items())), "", "",
                          f"< {TARGET_RSS_MB:.0f} MB each", verdict(worst < TARGET_RSS_MB))
        if run.cpu_s and run.done_s:
            table.add_row("  CPU over the run (upload to download)", cores(run.cpu_s, run.done_s + run.download_s),
                          "2 cores on this machine", "", "", "")
    for quick in fast:
        if quick.done_s is None:
            table.add_row(f"immediate path, {quick.tasks:,} tasks, {quick.workers} worker process(es)",
                          f"not done: {quick.error}", "", "", "", "")
            continue
        table.add_row(f"immediate path, {quick.tasks:,} urgent tasks, {quick.workers} worker process(es), "
                      "simulator at zero latency",
                      f"{quick.done_s:.1f} s = {quick.tasks / quick.done_s:,.0f} tasks/s\n{quick.counts}",
                      "", "", "", "")
        table.add_row("  CPU over that run", cores(quick.cpu_s, quick.done_s), "2 cores on this machine", "", "", "")
    console.print(table)
    if len(runs) > 1 or fast:
        scale = Table(title="scale-out: tasks/s per path by worker processes")
        for column in ("worker processes", "batch path (upload → all done)", "immediate path", "busiest (cores)"):
            scale.add_column(column)
        for run in runs:
            imm = next((f for f in fast if f.workers == run.workers), None)
            busiest = max(run.cpu_s.items(), key=lambda kv: kv[1]) if run.cpu_s else None
            scale.add_row(str(run.workers),
                          f"{run.tasks / run.done_s:,.0f} tasks/s ({run.done_s:.1f} s)" if run.done_s else "—",
                          f"{imm.tasks / imm.done_s:,.0f} tasks/s" if imm and imm.done_s else "—",
                          f"{busiest[0]} {busiest[1] / run.done_s:.2f}" if busiest and run.done_s else "—")
        console.print(scale)
    for run in runs:
        if run.worker_tasks:
            title = f"worker time by Celery task, {run.workers} worker process(es) (from the worker log)"
            print_task_times(console, title, run.worker_tasks)
        if run.batches:
            batches = Table(title=f"provider batches, {run.workers} worker process(es) (seconds after the first byte)")
            for column in ("lines", "claimed", "submitted", "completed", "ingested"):
                batches.add_column(column, justify="right")
            shown = run.batches if len(run.batches) <= 24 else run.batches[:12] + run.batches[-12:]
            for count, *moments in shown:
                batches.add_row(f"{count:,}", *(f"{m:.1f}" if m is not None else "—" for m in moments))
            console.print(batches)


# --- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000, help="items of the job")
    parser.add_argument("--via", choices=("ndjson", "cli"), default="ndjson",
                        help="one NDJSON POST /v1/jobs from this process, or `tierbatch submit FILE`")
    parser.add_argument("--worker-processes", default="2", metavar="LIST",
                        help="worker processes (prefork concurrency) per run, e.g. 1,2,4")
    parser.add_argument("--immediate-tasks", type=int, default=0, metavar="M",
                        help="after each run, M urgent tasks against the simulator at zero latency")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is given up")
    parser.add_argument("--raw-rows", type=int, default=200_000, help="rows / ops per raw-limit probe")
    add_run_arguments(parser)
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.worker_processes.split(",")]
    runs: list[BatchRun] = []
    fast: list[ImmediateRun] = []
    with run_place(args, "million") as place:
        raw = measure_raw_limits(args.database_url, args.redis_url, place.redis_prefix, args.raw_rows)
        for workers in worker_counts:
            run, quick = batch_run(args.database_url, args.redis_url, place.logs, workers, args,
                                   args.immediate_tasks)
            runs.append(run)
            if quick is not None:
                fast.append(quick)
        place.failed = any(run.error for run in runs)
    say("")
    report(raw, runs, fast)


if __name__ == "__main__":
    main()
