"""Retention of bodies: with `[retention] bodies_days = 1` the beat empties the prompts, outputs and provider
answers of tasks finished more than a day ago, and nothing else.

An API, worker and beat of this module's own config beside the session stack (`sibling_stack`), on its
database. Tasks are made through the API (immediate and batch path, a labelled job among them) and
finish; test setup then moves some of them three days back in SQL (their timestamps only), and the test
waits for the beat. A live task whose row is three days old is planted beside them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn, sibling_stack
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.tasks.retention import remove_bodies

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


def plant_live_task(dsn: str, like: str) -> str:
    """A copy of a finished task, running under a lease nobody will let expire, made three days ago."""
    live = str(uuid.uuid4())
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE planted AS SELECT * FROM tasks WHERE id = %s", (like,))
        conn.execute(
            "UPDATE planted SET id = %s, status = 'running', finished_at = NULL, lease_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 hour', created_at = now() - interval '3 days',"
            " started_at = now() - interval '3 days', idempotency_key = NULL", (live,))
        conn.execute("INSERT INTO tasks SELECT * FROM planted")
    return live


def move_back(dsn: str, ids: list[str]) -> None:
    """Test setup: these tasks were made and finished three days ago."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE tasks SET " + ", ".join(f"{c} = {c} - interval '3 days'" for c in MOVED)
                     + " WHERE id = ANY(%s::uuid[])", (ids,))


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
