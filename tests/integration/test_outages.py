"""Postgres restarted, then Redis restarted, under mixed load (task submissions, jobs, chat calls
streamed and not), on a private Postgres cluster and a private Redis of this test's own (the shared
servers of the other tests are never touched).

While a dependency is down, an answer is a success or a 503 with `retry-after` in the surface's
shape: never another 5xx, never a dropped connection; `/readyz` names what is down. Afterwards every
task is terminal, the ledger equals the tasks, nothing is half-written and no process has died.
The Redis has no persistence: its restart loses the queued messages, the reconciler must re-send them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.private_redis import PrivateRedis
from tests.support.procs import ManagedProcess, free_port, wait_until
from tests.support.stack import Stack, psycopg_dsn, write_app_config
from tierbatch.cli.embedded.postgres import EmbeddedPostgres
from tierbatch.migrations.runner import upgrade_to_head

pytestmark = pytest.mark.integration

DOWN_SECONDS = 3.0
JOB_ITEMS = 4


@dataclass
class Outcomes:
    """What the clients saw: statuses, 503s without retry-after, transport errors, accepted ids."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    missing_retry_after: list[str] = field(default_factory=list)
    bad_shapes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)  # job name -> answer status
    served: dict[str, str] = field(default_factory=dict)  # task id of a 2xx answer -> its kind
    stream_errors: int = 0  # streams that ended with an error event instead of [DONE]
    answered_at: list[float] = field(default_factory=list)  # monotonic times of the answers
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, response: httpx.Response, surface: str) -> None:
        with self.lock:
            self.statuses[(kind, response.status_code)] += 1
            self.answered_at.append(time.monotonic())
            task_id = response.headers.get("x-tierbatch-task-id")
            if response.status_code < 300 and kind in ("chat", "stream") and task_id:
                self.served[task_id] = kind
            if response.status_code == 503:
                if not response.headers.get("retry-after"):
                    self.missing_retry_after.append(kind)
                error = response.json().get("error", {})
                expected = {"message", "type", "param", "code"} if surface == "openai" else {"type", "message", "param"}
                if set(error) != expected or (surface == "openai" and error.get("type") != "server_error"):
                    self.bad_shapes.append(f"{kind}: {response.text[:200]}")

    def server_errors(self) -> dict[tuple[str, int], int]:
        return {key: n for key, n in self.statuses.items() if key[1] >= 500 and key[1] != 503}


def load(stack: Stack, key: str, stop: threading.Event, outcomes: Outcomes, worker: int) -> None:
    """One client looping over the four kinds of request until told to stop."""
    client = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            tag = f"w{worker}-{n}-{uuid.uuid4().hex[:6]}"  # unique prompts: no response-cache hits
            kind = ("task", "job", "chat", "stream")[n % 4]
            try:
                if kind == "task":
                    tier = "complex" if n % 8 == 0 else "light"
                    response = client.post("/v1/tasks", json={"prompt": f"Classify {tag}", "tier": tier})
                    outcomes.record(kind, response, "tenant")
                elif kind == "job":
                    name = f"job-{tag}"
                    response = client.post("/v1/jobs", json={"name": name, "tier": "complex", "urgent": True, "items": [
                        {"id": f"{tag}-{i}", "text": f"item {i} of {tag}"} for i in range(JOB_ITEMS)]})
                    outcomes.record(kind, response, "tenant")
                    with outcomes.lock:
                        outcomes.jobs[name] = response.status_code
                elif kind == "chat":
                    response = client.post("/v1/chat/completions", json={
                        "model": "smart-select", "messages": [{"role": "user", "content": f"Hello {tag}"}]})
                    outcomes.record(kind, response, "openai")
                else:
                    with client.stream("POST", "/v1/chat/completions", json={
                            "model": "smart-select", "stream": True,
                            "messages": [{"role": "user", "content": f"Stream {tag}"}]}) as response:
                        body = response.read()
                        if response.status_code == 200 and b"[DONE]" not in body:
                            # an error event in the stream is an answer; a stream cut short is not
                            with outcomes.lock:
                                if b'"error"' in body:
                                    outcomes.stream_errors += 1
                                else:
                                    outcomes.dropped.append(f"stream {tag}: ended without [DONE] or an error")
                        else:
                            outcomes.record(kind, response, "openai")
            except httpx.TransportError as exc:
                with outcomes.lock:
                    outcomes.dropped.append(f"{kind} {tag}: {type(exc).__name__}: {exc}")
            time.sleep(0.02)
    finally:
        client.close()


@contextlib.contextmanager
def running_load(stack: Stack, key: str, clients: int = 3) -> Iterator[Outcomes]:
    outcomes = Outcomes()
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(stack, key, stop, outcomes, i), daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def readiness(stack: Stack) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{stack.api_url}/readyz", timeout=10)
    return response.status_code, response.json()


def watch_while(seconds: float, probe: Callable[[], tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Probe readiness for `seconds` (the outage window)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            seen.append(probe())
        time.sleep(0.2)
    return seen


def errors_in_log(proc: ManagedProcess, most: int = 3) -> str:
    """The first tracebacks of a process's log (its tail alone may miss them)."""
    text = proc.log_path.read_text(errors="replace") if proc.log_path else ""
    parts = text.split("Traceback (most recent call last):")[1:most + 1]
    return "\n---\n".join(part[-2500:] for part in parts)


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[tuple[Stack, EmbeddedPostgres, PrivateRedis]]:
    # outside pytest's own temporary tree: pytest keeps that 0700, and Postgres runs as another user
    pg_dir = Path(tempfile.mkdtemp(prefix="tierbatch-outages-"))
    pg = EmbeddedPostgres(pg_dir, port=free_port(), dbname="tierbatch")
    redis_server = PrivateRedis(tmp_path)
    stack: Stack | None = None
    try:
        database_url = pg.start()
        upgrade_to_head(database_url)
        redis_server.start()
        simulator_port = free_port()
        config = write_app_config(tmp_path / "tierbatch.toml", simulator_port)
        stack = Stack(tmp=tmp_path, database_url=database_url, redis_url=redis_server.url, config_path=config,
                      simulator_port=simulator_port, api_port=free_port())
        stack.start_simulator()
        stack.start_api()
        stack.start_worker()
        stack.start_beat()
        yield stack, pg, redis_server
    finally:
        if stack is not None:
            stack.stop_all()
        redis_server.kill()
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


def test_postgres_then_redis_restarted_under_load(private_stack: tuple[Stack, EmbeddedPostgres, PrivateRedis]) -> None:
    stack, pg, redis_server = private_stack
    dsn = psycopg_dsn(stack.database_url)
    key = stack.new_tenant_key("outages")
    # a tenant with rate limits: its admission needs Redis, so the Redis window must answer it 503, not 500
    limited_id, limited_key = stack.new_tenant("outages-limited")
    with stack.admin_client() as admin:
        patched = admin.patch(f"/v1/admin/tenants/{limited_id}",
                              json={"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000})
        assert patched.status_code == 200, patched.text
    wait_until(lambda: readiness(stack)[0] == 200, 30, 0.2, "ready before the outages")

    with running_load(stack, key) as during_postgres:
        time.sleep(1.5)
        pg.stop()
        pg_window = time.monotonic()
        down = watch_while(DOWN_SECONDS, lambda: readiness(stack))
        pg_window_end = time.monotonic()
        pg.start()
        wait_until(lambda: readiness(stack)[0] == 200, 30, 0.2, "ready after the Postgres restart")
        time.sleep(1.5)

    with running_load(stack, key) as during_redis, running_load(stack, limited_key, clients=1) as limited:
        time.sleep(1.5)
        redis_server.kill()
        redis_window = time.monotonic()
        redis_down = watch_while(DOWN_SECONDS, lambda: readiness(stack))
        redis_window_end = time.monotonic()
        redis_server.start()
        wait_until(lambda: readiness(stack)[0] == 200, 30, 0.2, "ready after the Redis restart")
        time.sleep(1.5)

    # /readyz named the dependency that was down, with retry-after on its 503
    assert any(status == 503 and body["checks"]["database"] != "ok" and body["checks"]["broker"] == "ok"
               for status, body in down), down
    assert any(status == 503 and body["checks"]["broker"] != "ok" and body["checks"]["database"] == "ok"
               for status, body in redis_down), redis_down

    # the rate-limited tenant was refused with 503 (retry-after) while its limits could not be counted
    assert sum(n for (_, status), n in limited.statuses.items() if status == 503) > 0, limited.statuses
    for name, outcomes in (("postgres", during_postgres), ("redis", during_redis), ("redis, limited", limited)):
        assert not outcomes.dropped, (name, outcomes.dropped[:5])
        assert not outcomes.server_errors(), (name, outcomes.server_errors(), errors_in_log(stack.processes["api"]))
        assert not outcomes.missing_retry_after, (name, outcomes.missing_retry_after[:5])
        assert not outcomes.bad_shapes, (name, outcomes.bad_shapes[:3])
        assert sum(n for (_, status), n in outcomes.statuses.items() if status < 300) > 10, (name, outcomes.statuses)
    # the load went on through both windows (answers while the dependency was down)
    assert sum(pg_window <= t <= pg_window_end for t in during_postgres.answered_at) > 5
    assert sum(redis_window <= t <= redis_window_end for t in during_redis.answered_at) > 5
    # the Postgres window was really hit by submissions, and answered 503
    assert sum(n for (_, status), n in during_postgres.statuses.items() if status == 503) > 0, during_postgres.statuses

    # afterwards: every task terminal (the reconciler re-sent what the lost broker held)
    def all_terminal() -> bool:
        live = query(dsn, "SELECT count(*) FROM tasks WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")
        return live[0][0] == 0

    try:
        wait_until(all_terminal, 60, 0.5, "every task terminal")
    except TimeoutError:
        left = query(dsn, "SELECT status, mode, count(*) FROM tasks WHERE status NOT IN "
                     "('succeeded', 'failed', 'cancelled') GROUP BY 1, 2")
        raise AssertionError(f"tasks left: {left}\n{stack.processes['worker'].log_text()}") from None

    # the ledger equals the tasks: one row per succeeded task, same cost; none for the others
    (unmatched,), = query(dsn, """
        SELECT count(*) FROM tasks t
        WHERE (t.status = 'succeeded') <> ((SELECT count(*) FROM ledger_entries l WHERE l.task_id = t.id) = 1)
           OR (SELECT count(*) FROM ledger_entries l WHERE l.task_id = t.id) > 1""")
    assert unmatched == 0
    (task_cost, ledger_cost, succeeded), = query(dsn, """
        SELECT (SELECT sum(cost_usd) FROM tasks WHERE status = 'succeeded'),
               (SELECT sum(cost_usd) FROM ledger_entries),
               (SELECT count(*) FROM tasks WHERE status = 'succeeded')""")
    assert task_cost == ledger_cost
    assert succeeded > 20

    # every chat answer served (streamed or not) has its task and its ledger row: none was free
    served = {**during_postgres.served, **during_redis.served, **limited.served}
    recorded = dict(query(dsn, "SELECT t.id::text, count(l.id) FROM tasks t LEFT JOIN ledger_entries l "
                               "ON l.task_id = t.id WHERE t.status = 'succeeded' GROUP BY t.id"))
    unrecorded = Counter(kind for task_id, kind in served.items() if recorded.get(task_id) != 1)
    assert not unrecorded, unrecorded

    # nothing half-written: a job is there with all its items, or not at all
    counts = dict(query(dsn, "SELECT j.name, count(t.id) FROM jobs j LEFT JOIN tasks t ON t.job_id = j.id "
                             "GROUP BY j.name"))
    jobs = {**during_postgres.jobs, **during_redis.jobs, **limited.jobs}
    for name, status in jobs.items():
        if status == 202:
            assert counts.get(name) == JOB_ITEMS, (name, counts.get(name))
        else:
            assert counts.get(name, 0) in (0, JOB_ITEMS), (name, counts.get(name))

    # no process died
    for proc_name in ("api", "worker", "beat", "simulator"):
        assert stack.processes[proc_name].alive(), (proc_name, stack.processes[proc_name].log_text())
    # and the service works as before
    with stack.client(key) as client:
        chat = client.post("/v1/chat/completions", json={"model": "smart-select",
                                                           "messages": [{"role": "user", "content": "after"}]})
        assert chat.status_code == 200, chat.text
        assert json.loads(chat.content)["choices"]


def test_worker_consumes_again_after_a_redis_restart_with_calls_in_flight(
        private_stack: tuple[Stack, EmbeddedPostgres, PrivateRedis]) -> None:
    """Redis dies while the worker holds unacknowledged messages (calls in flight, more prefetched) and waits
    on its next BRPOP: once Redis is back the worker must take new work again, not sit without a consumer."""
    stack, _, redis_server = private_stack
    dsn = psycopg_dsn(stack.database_url)
    key = stack.new_tenant_key("in-flight")
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [3000, 3000]}}})
    with stack.client(key) as client:
        # more calls than the worker's 4 threads (the rest wait prefetched), fewer than its prefetch of 16
        before = [client.post("/v1/tasks", json={"prompt": f"Plan step {i}", "tier": "complex"}) for i in range(8)]
        assert all(r.status_code == 202 for r in before), [r.text for r in before]
        wait_until(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = 'running'")[0][0] >= 4,
                   30, 0.1, "calls in flight")
        worker = stack.processes["worker"]
        redis_server.kill()
        wait_until(lambda: worker.logged("Connection to broker lost"), 30, 0.1, "the worker seeing the broker gone")
        redis_server.start()
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [5, 20]}}})
        wait_until(lambda: readiness(stack)[0] == 200, 30, 0.2, "ready after the Redis restart")

        # new work after the restart reaches the worker through the new broker
        after = client.post("/v1/tasks", json={"prompt": "Plan after the restart", "tier": "complex"})
        assert after.status_code == 202, after.text
        try:
            task = stack.wait_for_task(client, after.json()["id"], {"succeeded", "failed"}, timeout=60)
        except AssertionError:
            raise AssertionError(f"not consumed after the restart:\n{errors_in_log(worker)}") from None
        assert task["status"] == "succeeded", task

        ids = [r.json()["id"] for r in before]
        for task_id in ids:
            assert stack.wait_for_task(client, task_id, {"succeeded"}, timeout=60)["status"] == "succeeded"
    # each call billed once, though its message was lost with the broker's memory
    rows = dict(query(dsn, "SELECT task_id::text, count(*) FROM ledger_entries GROUP BY 1"))
    assert {task_id: rows.get(task_id) for task_id in [*ids, after.json()["id"]]} == \
        {task_id: 1 for task_id in [*ids, after.json()["id"]]}
    assert worker.alive(), worker.log_text()
    assert not worker.logged("Unrecoverable error")


def test_worker_consumes_again_after_its_acknowledgements_failed_while_redis_was_down(
        private_stack: tuple[Stack, EmbeddedPostgres, PrivateRedis]) -> None:
    """Redis dies while the worker's prefetch is full (4 calls in flight, 12 messages waiting in the worker),
    and every one of them ends while Redis is down, its acknowledgement failing: once Redis is back the
    worker must take new work again, not wait forever for prefetch slots those messages still hold."""
    import redis

    stack, _, redis_server = private_stack
    key = stack.new_tenant_key("full-prefetch")
    broker = redis.Redis.from_url(redis_server.url)
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [1500, 1500]}}})
    worker = stack.processes["worker"]
    with stack.client(key) as client:
        before = [client.post("/v1/tasks", json={"prompt": f"Plan part {i}", "tier": "complex"}) for i in range(40)]
        assert all(r.status_code == 202 for r in before), [r.text for r in before]
        # 4 threads x prefetch multiplier 4: the worker holds 16 unacknowledged messages
        wait_until(lambda: broker.hlen(f"{stack.redis_prefix}unacked") >= 16, 30, 0.05, "the worker's prefetch full")
        broker.close()
        redis_server.kill()
        # all 16 end while Redis is down (their acknowledgements fail), or the worker sees the broker gone
        def failed_acks() -> int:
            return sum(str(line.get("message", "")).startswith("Couldn't ack") for line in worker.json_log_lines())

        wait_until(lambda: failed_acks() >= 16 or worker.logged("Connection to broker lost"), 60, 0.1,
                   "the held messages acknowledged in vain, or the loss seen")
        redis_server.start()
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [5, 20]}}})
        wait_until(lambda: readiness(stack)[0] == 200, 30, 0.2, "ready after the Redis restart")

        after = client.post("/v1/tasks", json={"prompt": "Plan after the restart", "tier": "complex"})
        assert after.status_code == 202, after.text
        task = stack.wait_for_task(client, after.json()["id"], {"succeeded", "failed"}, timeout=60)
        assert task["status"] == "succeeded", task
    assert worker.alive(), worker.log_text()
