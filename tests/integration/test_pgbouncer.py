"""tierbatch through PgBouncer in transaction pooling mode (`[database] pgbouncer = true`): the API, worker and
beat reach their database only through a PgBouncer that holds at most POOL_SIZE server connections to it.
Jobs on the immediate and the batch path end all succeeded with one ledger row per task, within that
budget, and a worker killed mid-run (calls in flight, an ingestion half written under its lock) bills
nothing twice once a new worker has finished the work."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.integration.conftest import SIM_BATCH_DEFAULTS
from tests.integration.test_batch_path import assert_no_double_billing, query
from tests.integration.test_jobs_api import items, wait_for_job
from tests.support.pgbouncer import PgBouncer
from tests.support.procs import wait_until
from tests.support.stack import Stack, own_stack, write_app_config

pytestmark = pytest.mark.integration

# fewer server connections than the processes' own pools could open (API 10 + 10, worker 5 + 10)
POOL_SIZE = 8


def write_config(path: Path, simulator_port: int) -> Path:
    return write_app_config(path, simulator_port, "[database]\npgbouncer = true\n")


@pytest.fixture(scope="module")
def bounced(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, PgBouncer]]:
    with PgBouncer(base_database_url, pool_size=POOL_SIZE) as bouncer, \
            own_stack(base_database_url, tmp_path_factory.mktemp("pgbouncer"), "tierbatch_pgbouncer", write_config,
                      processes_database=bouncer.url_for) as stack:
        stack.sim("POST", "/_sim/config", {"batch": SIM_BATCH_DEFAULTS})
        yield stack, bouncer


@dataclass
class Peak:
    value: int = 0


def direct_dsn(stack: Stack, bouncer: PgBouncer) -> str:
    """The stack's database on the server itself, not through PgBouncer."""
    url = make_url(stack.database_url).set(drivername="postgresql", host=bouncer.server.host,
                                           port=bouncer.server.port)
    return url.render_as_string(hide_password=False)


def advisory_locks_held(stack: Stack, bouncer: PgBouncer) -> int:
    """Advisory locks held by the server connections of the stack's database (a session-level lock taken
    through transaction pooling stays behind on one of them)."""
    with psycopg.connect(direct_dsn(stack, bouncer), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                           "WHERE l.locktype = 'advisory' AND a.datname = current_database()").fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def peak_server_connections(stack: Stack, bouncer: PgBouncer) -> Iterator[Peak]:
    """The most backends of the stack's database seen at once, read on a direct connection every 50 ms."""
    peak, stop = Peak(), threading.Event()

    def sample() -> None:
        with psycopg.connect(direct_dsn(stack, bouncer), autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND pid <> pg_backend_pid()").fetchone()
                peak.value = max(peak.value, int(row[0]) if row else 0)
                stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join(timeout=10)


def post_job(client: httpx.Client, name: str, count: int, *, urgent: bool) -> str:
    answer = client.post("/v1/jobs", json={"name": name, "tier": "light", "urgent": urgent,
                                           "items": items(count, name)})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def chat(stack: Stack, key: str, n: int) -> str:
    """One chat completion through the gateway; the id of the task it recorded."""
    with stack.client(key) as client:
        answer = client.post("/v1/chat/completions", json={
            "model": "smart-select", "messages": [{"role": "user", "content": f"Say hi {n}"}]})
    assert answer.status_code == 200, answer.text
    return str(answer.headers["x-tierbatch-task-id"])


def assert_jobs_done_and_billed_once(stack: Stack, client: httpx.Client, tenant_id: str, urgent: tuple[str, int],
                                     batched: tuple[str, int]) -> None:
    """Both jobs completed with every task succeeded, on the path of its job, with one ledger row each."""
    for job_id, count in (urgent, batched):
        assert wait_for_job(stack, client, job_id, timeout=120)["counts"] == {"succeeded": count}
    rows = query(stack, "SELECT j.name, t.mode::text, count(*) FROM tasks t JOIN jobs j ON j.id = t.job_id "
                        "WHERE t.tenant_id = %s GROUP BY 1, 2", tenant_id)
    assert {(str(name), str(mode)): int(n) for name, mode, n in rows} == {
        ("urgent", "immediate"): urgent[1], ("batched", "batch"): batched[1]}
    assert_no_double_billing(stack, tenant_id)
    tasks = urgent[1] + batched[1]
    assert query(stack, "SELECT count(*), count(DISTINCT task_id) FROM ledger_entries WHERE tenant_id = %s",
                 tenant_id) == [(tasks, tasks)]


def errors_logged(stack: Stack) -> list[str]:
    """The ERROR and CRITICAL lines of every process the stack started (a task failing on a statement
    prepared on another client's server connection is one: retried, it would still end succeeded)."""
    return [f"{name}: {str(line.get('message'))[:300]}" for name, proc in stack.processes.items() if "-" in name
            for line in proc.json_log_lines() if line.get("level") in ("ERROR", "CRITICAL")]


def test_jobs_on_both_paths_succeed_through_pgbouncer_with_one_ledger_row_per_task(
        bounced: tuple[Stack, PgBouncer]) -> None:
    stack, bouncer = bounced
    tenant, key = stack.new_tenant("pgbouncer-jobs")
    gateway_key = stack.new_tenant_key("pgbouncer-gateway")
    with peak_server_connections(stack, bouncer) as peak, stack.client(key) as client:
        urgent = post_job(client, "urgent", 300, urgent=True)
        batched = post_job(client, "batched", 400, urgent=False)
        assert_jobs_done_and_billed_once(stack, client, tenant, (urgent, 300), (batched, 400))
        served = [chat(stack, gateway_key, i) for i in range(8)]  # the gateway writer reuses one connection

    # the gateway's answers are billed: its writes commit through PgBouncer too
    assert dict(query(stack, "SELECT t.id::text, count(l.id) FROM tasks t LEFT JOIN ledger_entries l "
                             "ON l.task_id = t.id WHERE t.id = ANY(%s::uuid[]) AND t.status = 'succeeded' "
                             "GROUP BY t.id", served)) == dict.fromkeys(served, 1)
    # the processes used PgBouncer's connections, and no more of them than it holds
    assert 0 < peak.value <= POOL_SIZE, peak.value
    assert errors_logged(stack) == []
    # the batch steps' locks went with their transactions (a step may still be finishing its batch)
    wait_until(lambda: advisory_locks_held(stack, bouncer) == 0, 30, 0.2, "no advisory lock held")


def test_worker_killed_mid_run_through_pgbouncer_bills_nothing_twice(bounced: tuple[Stack, PgBouncer]) -> None:
    stack, bouncer = bounced
    tenant, key = stack.new_tenant("pgbouncer-crash")
    lines_before = stack.sim("GET", "/_sim/stats")["batch_lines"]
    # urgent calls still in flight when the worker dies
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o-mini": {"latency_ms": [250, 250]}}})
    stack.processes["worker"].kill()
    # a worker that stops after the first ingested chunk, holding the batch's ingest lock
    paused = stack.start_worker(pause_at="mid_ingest")
    try:
        with stack.client(key) as client:
            urgent = post_job(client, "urgent", 120, urgent=True)
            batched = post_job(client, "batched", 600, urgent=False)  # chunks of 50, 250, 250 and 50 lines

            def some_urgent_done_and_paused() -> bool:
                counts: dict[str, int] = client.get(f"/v1/jobs/{urgent}").json()["counts"]
                return paused.logged("PAUSED at mid_ingest") and 0 < counts.get("succeeded", 0) < 120

            wait_until(some_urgent_done_and_paused, 90, 0.05, "the ingestion paused with urgent calls in flight")
            paused.kill()
    finally:
        if paused.alive():
            paused.kill()
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o-mini": {"latency_ms": [20, 80]}}})
        stack.start_worker()

    with stack.client(key) as client:
        assert_jobs_done_and_billed_once(stack, client, tenant, (urgent, 120), (batched, 600))
    # each batch line went to the provider once: the killed ingestion was resumed, not resubmitted
    assert stack.sim("GET", "/_sim/stats")["batch_lines"] - lines_before == 600
    assert errors_logged(stack) == []
    wait_until(lambda: advisory_locks_held(stack, bouncer) == 0, 30, 0.2, "no advisory lock held")
