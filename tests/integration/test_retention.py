"""Retention of bodies: with `[retention] bodies_days = 1` the beat empties the prompts, outputs and provider
answers of tasks finished more than a day ago, and nothing else.

An API, worker and beat of this module's own config beside the session stack (`sibling_stack`), on its
database. Tasks are made through the API (immediate and batch path, a labelled job among them) and
finish; test setup then moves some of them three days back in SQL (their timestamps only), and the test
waits for the beat. A live task whose row is three days old is planted beside them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from psycopg.rows import dict_row

from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn, sibling_stack
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.tasks.retention import DUE_TASKS, remove_bodies

pytestmark = pytest.mark.integration

RETENTION = """
[retention]
bodies_days = 1
interval_seconds = 0.5
batch_size = 2
"""
LABELS = ["billing", "bug", "praise"]
TERMINAL = {"succeeded", "failed", "cancelled"}
MOVED = ("created_at", "updated_at", "dispatched_at", "started_at", "finished_at")
BODIES = ("request", "output", "response", "bodies_removed_at")


@pytest.fixture(scope="module")
def rstack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with sibling_stack(stack, Path(tmp_path_factory.mktemp("retention")), RETENTION) as own:
        yield own


def rows_of(dsn: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def task_rows(dsn: str, tenant_id: str) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in rows_of(dsn, "SELECT * FROM tasks WHERE tenant_id = %s", tenant_id)}


def ledger_rows(dsn: str, tenant_id: str) -> list[dict[str, Any]]:
    return rows_of(dsn, "SELECT * FROM ledger_entries WHERE tenant_id = %s ORDER BY id", tenant_id)


def wait_terminal(dsn: str, tenant_id: str, count: int) -> None:
    def done() -> bool:
        rows = task_rows(dsn, tenant_id)
        return len(rows) == count and all(r["status"] in TERMINAL for r in rows.values())

    wait_until(done, 90, 0.2, f"{count} tasks of the tenant finished")


def submit(client: httpx.Client) -> tuple[list[str], str]:
    """Immediate and batch-path tasks, and a labelled classification job on the batch path."""
    answer = client.post("/v1/tasks", json={"tasks": [
        {"prompt": "Write a haiku about invoices", "tier": "complex", "urgent": True},
        {"prompt": "Summarize: the meeting moved to Tuesday", "tier": "light", "urgent": True},
        {"prompt": "Summarize: the parcel arrived dented", "task_type": "summarization", "urgent": False},
        {"prompt": "Summarize: the printer is out of toner", "task_type": "summarization", "urgent": False},
    ]})
    assert answer.status_code == 202, answer.text
    job = client.post("/v1/jobs", json={
        "name": "tickets", "task_type": "classification", "tier": "light", "urgent": False, "labels": LABELS,
        "system": "Route the support ticket.", "template": "Ticket: {text}",
        "items": [{"id": f"t{i}", "text": f"Ticket {i}: I was charged twice this month"} for i in range(4)]})
    assert job.status_code == 202, job.text
    return [t["id"] for t in answer.json()["data"]], job.json()["id"]


def plant_live_task(dsn: str, like: str, shadow_of: str | None = None) -> str:
    """A copy of a finished task (or a shadow of `shadow_of`), running under a lease nobody will let
    expire, made three days ago."""
    live = str(uuid.uuid4())
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE planted AS SELECT * FROM tasks WHERE id = %s", (like,))
        conn.execute(
            "UPDATE planted SET id = %s, status = 'running', finished_at = NULL, lease_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 hour', created_at = now() - interval '3 days',"
            " started_at = now() - interval '3 days', idempotency_key = NULL, job_id = NULL, item_id = NULL,"
            " shadow_of = %s", (live, shadow_of))
        conn.execute("INSERT INTO tasks SELECT * FROM planted")
    return live


def move_back(dsn: str, ids: list[str], days: int = 3) -> None:
    """Test setup: these tasks were made and finished `days` days ago."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE tasks SET " + ", ".join(f"{c} = {c} - make_interval(days => %(days)s)" for c in MOVED)
                     + " WHERE id = ANY(%(ids)s::uuid[])", {"ids": ids, "days": days})


def results(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/jobs/{job_id}/results")
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


def dashboard_task_page(stack: Stack, key: str, task_id: str) -> str:
    with httpx.Client(base_url=stack.api_url, timeout=30, headers={"Origin": stack.api_url}) as browser:
        signed_in = browser.post("/dashboard/login", data={"secret": key})
        assert signed_in.status_code in (200, 303), signed_in.text
        page = browser.get(f"/dashboard/tasks/{task_id}")
        assert page.status_code == 200, page.text
        return page.text


def test_old_bodies_are_removed_and_everything_else_stays(rstack: Stack, sim_reset: Stack) -> None:
    dsn = psycopg_dsn(rstack.database_url)
    tenant_id, key = rstack.new_tenant("retention")
    live: str | None = None
    with rstack.client(key) as client:
        task_ids, job_id = submit(client)
        wait_terminal(dsn, tenant_id, 8)
        before = task_rows(dsn, tenant_id)
        job_tasks = sorted(i for i, r in before.items() if r["job_id"] is not None)
        assert {r["mode"] for r in before.values()} >= {"immediate", "batch"}
        assert all(r["output"] and r["response"] and r["request"].get("messages") for r in before.values()
                   if r["status"] == "succeeded")
        # the old ones: two immediate, one batch-path summary, three of the labelled job's four
        old = [task_ids[0], task_ids[1], task_ids[2], *job_tasks[:3]]
        recent = sorted(set(before) - set(old))
        ledger_before = ledger_rows(dsn, tenant_id)
        costs_before = client.get("/v1/costs", params={"group_by": "mode"}).json()
        results_before = results(client, job_id)
        live = plant_live_task(dsn, task_ids[0])
        try:
            move_back(dsn, old)

            def removed() -> bool:
                rows = task_rows(dsn, tenant_id)
                return all(rows[i]["bodies_removed_at"] is not None for i in old)

            wait_until(removed, 60, 0.2, "the beat removed the old bodies")
            after = task_rows(dsn, tenant_id)

            for task_id in old:
                was, now = before[task_id], after[task_id]
                # every column but the bodies is as it was (timestamps three days back, by the test setup)
                assert {c: v for c, v in now.items() if c not in BODIES} == {
                    c: (v - timedelta(days=3) if c in MOVED and v is not None else v)
                    for c, v in was.items() if c not in BODIES}
                assert now["request"] == {} and now["response"] is None
                assert now["bodies_removed_at"] > now["finished_at"]
                if now["job_id"] is None:
                    assert now["output"] is None
                else:  # a labelled answer keeps its label, and nothing more
                    assert json.loads(now["output"]) == {"label": json.loads(was["output"])["label"]}
            for task_id in recent:
                assert after[task_id] == before[task_id]
            assert after[live]["bodies_removed_at"] is None and after[live]["output"] == before[task_ids[0]]["output"]
            assert after[live]["request"] == before[task_ids[0]]["request"]

            assert ledger_rows(dsn, tenant_id) == ledger_before
            assert client.get("/v1/costs", params={"group_by": "mode"}).json() == costs_before
            assert results(client, job_id) == results_before  # labels, statuses and costs of the job stay

            shown = client.get(f"/v1/tasks/{task_ids[0]}").json()
            assert shown["output"] is None and shown["response"] is None and "messages" not in shown
            assert shown["bodies_removed_at"] is not None and shown["status"] == before[task_ids[0]]["status"]
            assert shown["usage"]["input_tokens"] == before[task_ids[0]]["input_tokens"]
            kept = client.get(f"/v1/tasks/{recent[0]}").json()
            assert kept["bodies_removed_at"] is None and kept["output"] == before[recent[0]]["output"]
            page = dashboard_task_page(rstack, key, task_ids[0])
            assert "Prompt and answer removed on" in page

            # a second pass finds nothing and changes nothing
            engine = make_engine(rstack.database_url)
            try:
                with make_session_factory(engine).begin() as session:
                    assert remove_bodies(session, after[old[0]]["finished_at"] + timedelta(days=2), 1000) == 0
            finally:
                engine.dispose()
            assert task_rows(dsn, tenant_id) == after
        finally:
            with psycopg.connect(dsn) as conn:
                conn.execute("DELETE FROM tasks WHERE id = %s", (live,))


def facade_batch(client: httpx.Client, count: int) -> str:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "smart-select", "messages": [{"role": "user", "content": f"Say {i}"}]}}
             for i in range(count)]
    content = "".join(json.dumps(item) + "\n" for item in lines).encode()
    uploaded = client.post("/v1/files", files={"file": ("requests.jsonl", content)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    created = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                               "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def test_bodies_wait_for_a_live_shadow_and_for_the_batch_output_file(rstack: Stack, sim_reset: Stack) -> None:
    """A task with a live shadow keeps its answer (the comparison reads it when the shadow finishes), and
    the lines of a facade batch keep theirs until its output file is assembled (then the file keeps them)."""
    dsn = psycopg_dsn(rstack.database_url)
    tenant_id, key = rstack.new_tenant("retention-waits")
    shadow: str | None = None
    with rstack.client(key) as client:
        answer = client.post("/v1/tasks", json={"tasks": [
            {"prompt": f"Name a colour, {n}", "tier": "light", "urgent": True} for n in ("control", "shadowed")]})
        assert answer.status_code == 202, answer.text
        control, shadowed = (t["id"] for t in answer.json()["data"])
        batch_id = facade_batch(client, 2)
        wait_terminal(dsn, tenant_id, 4)
        lines = [i for i, r in task_rows(dsn, tenant_id).items() if r["job_id"] is not None]
        shadow = plant_live_task(dsn, control, shadow_of=shadowed)
        try:
            # the waiting ones finished before the control: a tick that reached the control saw them first
            move_back(dsn, [shadowed, *lines], days=4)
            move_back(dsn, [control], days=3)
            wait_until(lambda: task_rows(dsn, tenant_id)[control]["bodies_removed_at"] is not None, 60, 0.2,
                       "the control's bodies removed")
            rows = task_rows(dsn, tenant_id)
            for waiting in (shadowed, *lines):
                assert rows[waiting]["bodies_removed_at"] is None and rows[waiting]["output"], waiting

            with psycopg.connect(dsn) as conn:  # test setup: the shadow finishes
                conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = now(), lease_token = NULL,"
                             " lease_expires_at = NULL WHERE id = %s", (shadow,))
            wait_until(lambda: task_rows(dsn, tenant_id)[shadowed]["bodies_removed_at"] is not None, 60, 0.2,
                       "the shadowed task's bodies removed once its shadow finished")
            assert all(task_rows(dsn, tenant_id)[i]["bodies_removed_at"] is None for i in lines)

            finished = client.get(f"/v1/batches/{batch_id}").json()  # the first read assembles the files
            assert finished["status"] == "completed", finished
            output = client.get(f"/v1/files/{finished['output_file_id']}/content")
            assert output.status_code == 200
            answered = [json.loads(raw) for raw in output.text.splitlines()]
            assert sorted(a["custom_id"] for a in answered) == ["req-0", "req-1"]
            assert all(a["response"]["body"]["choices"][0]["message"]["content"] for a in answered)
            wait_until(lambda: all(task_rows(dsn, tenant_id)[i]["bodies_removed_at"] is not None for i in lines),
                       60, 0.2, "the batch lines' bodies removed once the output file was assembled")
            # the file is the tenant's to delete (DELETE /v1/files/{id}); retention leaves it whole
            assert client.get(f"/v1/files/{finished['output_file_id']}/content").text == output.text
        finally:
            with psycopg.connect(dsn) as conn:
                conn.execute("DELETE FROM tasks WHERE id = %s", (shadow,))


def test_the_purge_reads_the_index_of_kept_bodies(stack: Stack) -> None:
    """The finished tasks whose bodies are kept, oldest first, from `ix_tasks_bodies_kept` (never the
    rows already emptied); shadows and facade batches by their own indexes."""
    engine = make_engine(stack.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(row[0] for row in connection.execute(
                sa.text("EXPLAIN " + str(DUE_TASKS)), {"cutoff": datetime.now(UTC), "limit": 5000}))
    finally:
        engine.dispose()
    # an index scan, or a bitmap scan then a sort once the session's database holds many due rows; on each
    # monthly partition, its own index of that name (ix_tasks_bodies_kept_2026_12)
    assert re.search(r"(Index Scan using|Bitmap Index Scan on) ix_tasks_bodies_kept(_\w+)?\b", plan), plan
    assert "Seq Scan" not in plan, plan
    assert not re.search(r"Scan (using|on) (ix_tasks_tenant_created|pk_tasks)", plan), plan


def test_cached_answers_stored_before_the_cutoff_are_deleted(rstack: Stack) -> None:
    """An answer cached three days ago under a longer TTL (before retention was set) goes; a fresh one stays."""
    dsn = psycopg_dsn(rstack.database_url)
    tenant_id, _ = rstack.new_tenant("retention-cache")
    old, fresh = b"o" * 32, b"f" * 32
    with psycopg.connect(dsn) as conn:
        for key, age in ((old, "3 days"), (fresh, "1 hour")):
            conn.execute(
                "INSERT INTO response_cache (tenant_id, key, status, provider, requested_model, served_model, output,"
                " response, input_tokens, output_tokens, created_at, expires_at) VALUES (%s, %s, 'ready', 'sim',"
                " 'gpt-4o-mini', 'gpt-4o-mini', 'blue', '{\"choices\": []}', 5, 1, now() - %s::interval,"
                " now() + interval '30 days')", (tenant_id, key, age))

    def keys() -> set[bytes]:
        return {bytes(r["key"]) for r in rows_of(dsn, "SELECT key FROM response_cache WHERE tenant_id = %s",
                                                 tenant_id)}

    wait_until(lambda: old not in keys(), 60, 0.2, "the old cached answer deleted")
    assert keys() == {fresh}
