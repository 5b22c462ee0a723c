"""Monthly partitions of `tasks` and `ledger_entries`: the beat keeps the months ahead (moving what the
DEFAULT partition holds of a new month into it), and with `[retention] tasks_days` drops a month of
finished tasks whole, while every ledger row, the rollup and the cost figures stay.

A stack of its own (simulator, API, worker, beat) on a database of its own: dropping a month of tasks
must not take the session's tasks with it. Tasks of other months are made by the product's own code in
this process (`insert_tasks`, `submit_job`) with an injected clock, the seam of the task ids
(tierbatch/base/ids.py), then dispatched to the stack's worker like any other; a test holds the upkeep's
advisory lock while it sets a month up, so the beat's tick waits for it (it skips while another holds it).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import text

from tests.integration.conftest import SIM_BATCH_DEFAULTS, SIM_DEFAULTS
from tests.support.procs import wait_until
from tests.support.stack import Stack, advisory_lock_held, own_stack, psycopg_dsn, write_app_config
from tierbatch.base.config import AppConfig, load_config
from tierbatch.base.ids import Clock, Month, new_task_id
from tierbatch.base.messaging import DISPATCH_TASKS, make_producer
from tierbatch.base.settings import Settings
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.partitions import create_month_partition, month_partition
from tierbatch.jobs.requests import parse_job_request
from tierbatch.jobs.store import submit_job
from tierbatch.tasks.partitions import LOCK_TIMEOUT_MS, UPKEEP_LOCK, Upkeep, drop_month, droppable, run_upkeep
from tierbatch.tasks.store import cancel_task, insert_tasks
from tierbatch.tasks.submission import parse_submission

pytestmark = pytest.mark.integration

CONFIG = """
[retention]
tasks_days = 30
interval_seconds = 0.5
batch_size = 2

[quality]
shadow_rate = 1.0
"""
TERMINAL = ("succeeded", "failed", "cancelled")
LABELS = ["billing", "bug", "praise"]


def rows_of(stack: Stack, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(psycopg_dsn(stack.database_url), row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def partition_names(stack: Stack, parent: str) -> set[str]:
    return {r["relname"] for r in rows_of(stack, "SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                                                 "ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass", parent)}


def at(instant: datetime) -> Clock:
    return lambda: instant.timestamp()


def dispatch(stack: Stack, task_ids: list[str]) -> None:
    producer = make_producer(Settings(REDIS_URL=stack.redis_url,  # type: ignore[call-arg]
                                      TIERBATCH_REDIS_PREFIX=stack.redis_prefix))
    try:
        producer.send_task(DISPATCH_TASKS, args=[task_ids])
    finally:
        producer.close()


@contextlib.contextmanager
def product_session(stack: Stack) -> Iterator[tuple[Any, AppConfig]]:
    """A transaction of this process on the stack's database, with the stack's config."""
    engine = make_engine(stack.database_url)
    try:
        with make_session_factory(engine).begin() as session:
            yield session, load_config(stack.config_path)
    finally:
        engine.dispose()


@contextlib.contextmanager
def upkeep_waits(stack: Stack) -> Iterator[None]:
    """Hold the upkeep's advisory lock: the beat's partitions tick does nothing until it is released."""
    with advisory_lock_held(stack, "hashtextextended(%s, 0)", UPKEEP_LOCK):
        yield


def task_rows(stack: Stack, tenant_id: str) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in rows_of(stack, "SELECT *, tableoid::regclass::text AS home FROM tasks "
                                                    "WHERE tenant_id = %s", tenant_id)}


def ledger_rows(stack: Stack, tenant_id: str) -> list[dict[str, Any]]:
    return rows_of(stack, "SELECT *, tableoid::regclass::text AS home FROM ledger_entries WHERE tenant_id = %s "
                          "ORDER BY id", tenant_id)


def rollup(stack: Stack, tenant_id: str) -> list[dict[str, Any]]:
    return rows_of(stack, "SELECT * FROM ledger_daily WHERE tenant_id = %s ORDER BY id", tenant_id)


def wait_all_finished(stack: Stack, tenant_id: str, count: int) -> dict[str, dict[str, Any]]:
    def finished() -> dict[str, dict[str, Any]] | None:
        rows = task_rows(stack, tenant_id)
        return rows if len(rows) == count and all(r["status"] in TERMINAL for r in rows.values()) else None

    try:
        return wait_until(finished, 120, 0.2, f"{count} tasks finished")  # type: ignore[return-value]
    except TimeoutError:
        statuses = [(r["status"], r["shadow_of"] is not None) for r in task_rows(stack, tenant_id).values()]
        log = stack.processes["worker"].log_text()[-5000:]
        raise AssertionError(f"tasks: {statuses}\nworker log:\n{log}") from None


@dataclass(frozen=True)
class AheadSetup:
    """A task of month +3, made while that month had no partition (so in the DEFAULT), and answered."""

    month: Month
    tenant_id: str
    key: str
    task_id: str
    task: dict[str, Any]
    ledger: list[dict[str, Any]]
    rollup: list[dict[str, Any]]
    shown: dict[str, Any]


@dataclass(frozen=True)
class PartitionStack:
    stack: Stack
    ahead: AheadSetup


def plant_ahead(stack: Stack) -> AheadSetup:
    """Before the beat ever runs: a task whose id is of month +3 (no partition yet: the migration makes this
    month and the next), answered by the worker, so its row and its ledger row are in the DEFAULTs."""
    month = Month.of(datetime.now(UTC)).plus(3)
    assert month_partition("tasks", month) not in partition_names(stack, "tasks")
    tenant_id, key = stack.new_tenant("ahead")
    with product_session(stack) as (session, config):
        specs = parse_submission({"tasks": [{"prompt": "Say hi to the future", "tier": "light", "urgent": True}]},
                                 10, config.limits.max_prompt_bytes)
        accepted = insert_tasks(session, uuid.UUID(tenant_id), specs, config,
                                clock=at(month.start + timedelta(days=9, hours=7)))
    task_id = str(accepted[0].id)
    dispatch(stack, [task_id])
    with stack.client(key) as client:
        stack.wait_for_task(client, task_id, {"succeeded"})
        # the quality monitor's comparison comes after the answer (and adds its cost to the task): wait for
        # it, so nothing changes meanwhile
        wait_until(lambda: rows_of(stack, "SELECT 1 FROM quality_comparisons WHERE task_id = %s", task_id), 60,
                   0.2, "the shadow comparison")
        shown = client.get(f"/v1/tasks/{task_id}").json()
    task = task_rows(stack, tenant_id)[task_id]
    ledger = ledger_rows(stack, tenant_id)
    assert task["home"] == "tasks_default" and {r["home"] for r in ledger} == {"ledger_entries_default"}
    assert len(ledger) == 2  # the answer and the monitor's shadow call, both under the task's id
    return AheadSetup(month, tenant_id, key, task_id, task, ledger, rollup(stack, tenant_id), shown)


@pytest.fixture(scope="module")
def pstack(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PartitionStack]:
    with own_stack(base_database_url, Path(tmp_path_factory.mktemp("partitions")), "tierbatch_partitions",
                   lambda path, port: write_app_config(path, port, CONFIG), beat=False) as stack:
        stack.sim("POST", "/_sim/config", {"models": SIM_DEFAULTS, "batch": SIM_BATCH_DEFAULTS})
        ahead = plant_ahead(stack)
        stack.start_beat()
        yield PartitionStack(stack, ahead)


def metric(stack: Stack, series: str) -> float:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def test_the_beat_makes_the_months_ahead_and_moves_what_the_default_held_of_them(pstack: PartitionStack) -> None:
    stack, ahead = pstack.stack, pstack.ahead
    current = Month.of(datetime.now(UTC))
    wanted = {current.plus(k) for k in range(4)}

    def made() -> bool:
        return all({month_partition(parent, m) for m in wanted} <= partition_names(stack, parent)
                   for parent in ("tasks", "ledger_entries"))

    wait_until(made, 60, 0.2, "the beat made this month's and the next three months' partitions")
    # the task and both its ledger rows moved into month +3, unchanged; nothing stayed behind or doubled
    task = task_rows(stack, ahead.tenant_id)[ahead.task_id]
    assert task["home"] == month_partition("tasks", ahead.month)
    assert {k: v for k, v in task.items() if k != "home"} == {k: v for k, v in ahead.task.items() if k != "home"}
    ledger = ledger_rows(stack, ahead.tenant_id)
    assert {r["home"] for r in ledger} == {month_partition("ledger_entries", ahead.month)}
    assert [{k: v for k, v in r.items() if k != "home"} for r in ledger] == [
        {k: v for k, v in r.items() if k != "home"} for r in ahead.ledger]
    assert rows_of(stack, "SELECT count(*) AS n FROM tasks_default WHERE id = %s", ahead.task_id)[0]["n"] == 0
    assert rollup(stack, ahead.tenant_id) == ahead.rollup  # moved partition to partition: not summed again
    with stack.client(ahead.key) as client:
        assert client.get(f"/v1/tasks/{ahead.task_id}").json() == ahead.shown
    assert metric(stack, 'tierbatch_partitions_total{action="created",table="ledger_entries"}') >= 2
    assert metric(stack, 'tierbatch_partitions_total{action="created",table="tasks"}') >= 2


def plant_live_task(stack: Stack, like: str, task_id: uuid.UUID) -> None:
    """Test setup: a copy of a finished task under `task_id`, running under a lease nobody will let expire."""
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        conn.execute("CREATE TEMP TABLE planted AS SELECT * FROM tasks WHERE id = %s", (like,))
        conn.execute(
            "UPDATE planted SET id = %s, status = 'running', finished_at = NULL, lease_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 hour', idempotency_key = NULL, job_id = NULL, item_id = NULL,"
            " shadow_of = NULL", (task_id,))
        conn.execute("INSERT INTO tasks SELECT * FROM planted")


def job_body(name: str, items: list[str]) -> dict[str, Any]:
    return {"name": name, "task_type": "classification", "tier": "light", "urgent": False, "labels": LABELS,
            "template": "Ticket: {text}", "items": [{"id": i, "text": f"Ticket {i}: charged twice"} for i in items]}


def test_a_month_of_finished_tasks_is_dropped_whole_and_its_ledger_stays(pstack: PartitionStack) -> None:
    stack = pstack.stack
    tenant_id, key = stack.new_tenant("retired")
    now = datetime.now(UTC)
    old, held = Month.of(now).plus(-3), Month.of(now).plus(-2)  # both ended more than tasks_days ago
    items = ["old-0", "old-1", "old-2"]
    with upkeep_waits(stack):
        with product_session(stack) as (session, config):
            for month in (old, held):
                for parent in ("tasks", "ledger_entries"):
                    create_month_partition(session.connection(), parent, month)
            clock = at(old.start + timedelta(days=12))
            specs = parse_submission({"tasks": [
                {"prompt": "Summarize: the meeting moved", "tier": "light", "urgent": True,
                 "idempotency_key": "retired-key"},
                {"prompt": "Summarize: the parcel arrived", "tier": "light", "urgent": True},
                {"prompt": "Summarize: the printer is out of toner", "tier": "light", "urgent": False},
            ]}, 10, config.limits.max_prompt_bytes)
            accepted = [str(a.id) for a in insert_tasks(session, uuid.UUID(tenant_id), specs, config, clock=clock)]
            job = submit_job(session, uuid.UUID(tenant_id), parse_job_request(
                job_body("old-tickets", items), config.limits.max_prompt_bytes), config, clock=clock)
        old_ids = [*accepted, *job.task_ids]
        dispatch(stack, old_ids)
        # every one light: each has a shadow (a task of the same month on the batch path), 4 of them
        rows = wait_all_finished(stack, tenant_id, len(old_ids) + 4)
        assert {r["home"] for r in rows.values()} == {month_partition("tasks", old)}
        wait_until(lambda: len(rows_of(stack, "SELECT 1 FROM quality_comparisons WHERE tenant_id = %s",
                                       tenant_id)) == len(old_ids), 60, 0.2, "every comparison recorded")
        live = new_task_id(at(held.start + timedelta(days=3)))
        plant_live_task(stack, old_ids[1], live)
        assert task_rows(stack, tenant_id)[str(live)]["home"] == month_partition("tasks", held)
        ledger_before, rollup_before = ledger_rows(stack, tenant_id), rollup(stack, tenant_id)
        assert {r["home"] for r in ledger_before} == {month_partition("ledger_entries", old)}
        assert len(ledger_before) == 2 * len(old_ids)  # each answer and its shadow's
        comparisons_before = rows_of(stack, "SELECT id, agreed FROM quality_comparisons WHERE tenant_id = %s "
                                            "ORDER BY id", tenant_id)
        with stack.client(key) as client:
            costs_before = client.get("/v1/costs", params={"group_by": "mode"}).json()
            assert {r["mode"] for r in costs_before["rows"]} == {"immediate", "batch", "shadow"}, costs_before
            job_before = client.get(f"/v1/jobs/{job.job.id}").json()
            # while the month is kept, its item ids are taken and its key names its task
            assert client.post("/v1/jobs", json=job_body("old-tickets", ["old-1"])).status_code == 409

    with stack.client(key) as client:
        def dropped() -> bool:
            return all(client.get(f"/v1/tasks/{task_id}").status_code == 404 for task_id in old_ids)

        wait_until(dropped, 60, 0.2, "the old month dropped")
        wait_until(lambda: not rows_of(stack, "SELECT 1 FROM pg_class WHERE relname = %s",
                                       f"tasks_{old}_dropped"), 60, 0.2, "the cleaning after the drop")
        assert month_partition("tasks", old) not in partition_names(stack, "tasks")
        assert set(task_rows(stack, tenant_id)) == {str(live)}  # the month with a live task stays
        assert month_partition("tasks", held) in partition_names(stack, "tasks")
        # the money stays: every ledger row, the rollup, the cost figures, the job's cost
        assert ledger_rows(stack, tenant_id) == ledger_before
        assert rollup(stack, tenant_id) == rollup_before
        assert client.get("/v1/costs", params={"group_by": "mode"}).json() == costs_before
        job_after = client.get(f"/v1/jobs/{job.job.id}").json()
        assert job_after["task_count"] == 0
        assert {k: job_after[k] for k in ("cost_usd", "baseline_cost_usd", "savings_usd")} == {
            k: job_before[k] for k in ("cost_usd", "baseline_cost_usd", "savings_usd")}
        # the comparisons stay, no longer naming a task; the key and the item ids are free again
        comparisons = rows_of(stack, "SELECT id, agreed, task_id FROM quality_comparisons WHERE tenant_id = %s "
                                     "ORDER BY id", tenant_id)
        assert [(c["id"], c["agreed"]) for c in comparisons] == [(c["id"], c["agreed"]) for c in comparisons_before]
        assert {c["task_id"] for c in comparisons} == {None}
        assert not rows_of(stack, "SELECT 1 FROM task_idempotency_keys WHERE tenant_id = %s", tenant_id)
        assert not rows_of(stack, "SELECT 1 FROM job_item_ids WHERE job_id = %s", job.job.id)
        again = client.post("/v1/tasks", json={"prompt": "Summarize: again", "tier": "light",
                                                "idempotency_key": "retired-key"})
        assert again.status_code == 202 and again.json()["id"] not in old_ids
        appended = client.post("/v1/jobs", json=job_body("old-tickets", ["old-1"]))
        assert appended.status_code == 202, appended.text
        assert appended.json()["id"] == str(job.job.id)
    assert metric(stack, 'tierbatch_partitions_total{action="dropped",table="tasks"}') >= 1


def test_an_upkeep_refused_its_lock_in_time_gives_up_and_the_next_one_goes_on(pstack: PartitionStack) -> None:
    """A reader of the DEFAULT partition holds its lock: making a month (ATTACH takes the DEFAULT's exclusive
    lock) waits LOCK_TIMEOUT_MS at most, gives up without error, and the next upkeep does it. The clock is
    set ahead (a seam of `run_upkeep`), so the months it must make are ones the beat does not."""
    stack = pstack.stack
    later = datetime.now(UTC) + timedelta(days=31 * 9)
    engine = make_engine(stack.database_url)

    def upkeep() -> Upkeep:
        def ran() -> Upkeep | None:  # the beat's own upkeep may hold the lock for a moment: then try again
            done = run_upkeep(engine, later, tasks_days=None, batch_size=10, budget_seconds=10)
            return None if done.skipped else done

        return wait_until(ran, 30, 0.1, "an upkeep that ran")  # type: ignore[return-value]

    try:
        with psycopg.connect(psycopg_dsn(stack.database_url)) as reader:
            reader.execute("SELECT count(*) FROM tasks_default")  # a transaction left open: its lock stays
            started = time.monotonic()
            refused = upkeep()
            assert time.monotonic() - started < 5 * LOCK_TIMEOUT_MS / 1000
            assert refused.created == []
            reader.rollback()
        made = upkeep()
        assert month_partition("tasks", Month.of(later)) in made.created
        assert {month_partition(parent, Month.of(later).plus(3)) for parent in ("tasks", "ledger_entries")} <= (
            partition_names(stack, "tasks") | partition_names(stack, "ledger_entries"))
    finally:
        engine.dispose()


def test_a_past_month_whose_tasks_wait_in_the_default_gets_its_partition(pstack: PartitionStack) -> None:
    """Rows of a month written while the beat was down for longer than the months ahead are in the DEFAULT:
    the beat makes that month's partition too (since the oldest month that has one), moving them into it."""
    stack = pstack.stack
    tenant_id, key = stack.new_tenant("behind")
    now = datetime.now(UTC)
    kept, behind = Month.of(now).plus(-8), Month.of(now).plus(-7)
    with upkeep_waits(stack):
        with product_session(stack) as (session, config):
            specs = parse_submission({"tasks": [{"prompt": "Say hi", "tier": "light", "urgent": True}]}, 10,
                                     config.limits.max_prompt_bytes)
            for parent in ("tasks", "ledger_entries"):
                create_month_partition(session.connection(), parent, kept)
            anchor = str(insert_tasks(session, uuid.UUID(tenant_id), specs, config,
                                      clock=at(kept.start + timedelta(days=2)))[0].id)
        # both stay live (a lease nobody lets expire), so retention keeps their months
        plant_live_task(stack, anchor, new_task_id(at(kept.start + timedelta(days=3))))
        waiting = new_task_id(at(behind.start + timedelta(days=20)))
        plant_live_task(stack, anchor, waiting)
        assert task_rows(stack, tenant_id)[str(waiting)]["home"] == "tasks_default"
    wait_until(lambda: task_rows(stack, tenant_id)[str(waiting)]["home"] == month_partition("tasks", behind), 60, 0.2,
               "the month behind made, its task moved out of the DEFAULT")
    with stack.client(key) as client:
        assert client.get(f"/v1/tasks/{waiting}").json()["status"] == "running"


def test_a_drop_cut_short_before_its_cleaning_is_finished_by_the_next_tick(pstack: PartitionStack) -> None:
    """The upkeep dies right after dropping a month (its process killed): the month's marker table says so,
    and the next tick clears what still refers to the dropped tasks. Here the drop is made in this process
    (the step the tick takes) while the beat waits for the lock, and nothing else runs after it."""
    stack = pstack.stack
    tenant_id, key = stack.new_tenant("cut-short")
    month = Month.of(datetime.now(UTC)).plus(-11)
    engine = make_engine(stack.database_url)
    try:
        # this connection holds the upkeep's lock as a session lock: the beat's steps skip, while the
        # steps run here (the same session) take it again
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), {"key": UPKEEP_LOCK})
            connection.commit()
            with product_session(stack) as (session, config):
                for parent in ("tasks", "ledger_entries"):
                    create_month_partition(session.connection(), parent, month)
                specs = parse_submission({"tasks": [{"prompt": "Say hi", "tier": "light", "idempotency_key": "k1"}]},
                                         10, config.limits.max_prompt_bytes)
                task_id = insert_tasks(session, uuid.UUID(tenant_id), specs, config,
                                       clock=at(month.start + timedelta(days=4)))[0].id
                cancel_task(session, uuid.UUID(tenant_id), task_id)  # finished without a call
            partition = droppable(connection, datetime.now(UTC) - timedelta(days=30))
            connection.commit()
            assert partition is not None and partition.name == month_partition("tasks", month)
            assert drop_month(connection, partition, datetime.now(UTC) - timedelta(days=30))
            # cut short here: the task is gone, its key still names it, the marker waits
            assert rows_of(stack, "SELECT task_id FROM task_idempotency_keys WHERE tenant_id = %s",
                           tenant_id) == [{"task_id": task_id}]
            assert rows_of(stack, "SELECT 1 FROM pg_class WHERE relname = %s", f"tasks_{month}_dropped")
            with stack.client(key) as client:
                assert client.get(f"/v1/tasks/{task_id}").status_code == 404
            connection.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": UPKEEP_LOCK})
            connection.commit()
        wait_until(lambda: not rows_of(stack, "SELECT 1 FROM pg_class WHERE relname = %s", f"tasks_{month}_dropped"),
                   60, 0.2, "the next tick finished the cleaning")
        assert not rows_of(stack, "SELECT 1 FROM task_idempotency_keys WHERE tenant_id = %s", tenant_id)
    finally:
        engine.dispose()
