"""A SQL source in a second database on the same server, read incrementally by a cursor column across
runs; the worker gets the source URL from an environment variable the schedule names."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.integration.test_schedules import JOB, classifications, create_schedule, run_now, wait_run
from tests.support.stack import Stack, psycopg_dsn, scratch_database

pytestmark = pytest.mark.integration

BASE = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
QUERY = "select id, body, updated_at from tickets where updated_at > :cursor order by updated_at"


@pytest.fixture
def tickets_db(base_database_url: str) -> Iterator[str]:
    with scratch_database(base_database_url, prefix="tierbatch_source") as url, \
            psycopg.connect(psycopg_dsn(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE tickets (id integer PRIMARY KEY, body text NOT NULL, "
                     "updated_at timestamptz NOT NULL)")
        yield url


@pytest.fixture
def worker_with_source(sim_reset: Stack, tickets_db: str) -> Iterator[Stack]:
    """The stack's worker restarted with TICKETS_DB_URL set (a plain postgresql:// URL), then restored."""
    stack = sim_reset
    stack.processes["worker"].kill()
    try:
        stack.start_worker({"TICKETS_DB_URL": psycopg_dsn(tickets_db)})
        yield stack
    finally:
        stack.processes["worker"].kill()
        stack.start_worker()


def tickets(url: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
    with psycopg.connect(psycopg_dsn(url), autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(sql, rows)


def test_sql_source_is_read_incrementally_by_its_cursor(worker_with_source: Stack, tickets_db: str) -> None:
    stack = worker_with_source
    tickets(tickets_db, "INSERT INTO tickets VALUES (%s, %s, %s)",
            [(i, f"Ticket {i}: the invoice is wrong", BASE + timedelta(seconds=i)) for i in range(1, 31)])
    with stack.client(stack.new_tenant_key()) as client:
        schedule = create_schedule(client, name="sql-tickets", cron="0 2 * * *", timezone="Europe/Paris",
                                   enabled=False, job={**JOB, "urgent": True}, source={
                                       "type": "sql", "url_env": "TICKETS_DB_URL", "query": QUERY, "id_field": "id",
                                       "text_field": "body", "cursor_field": "updated_at",
                                       "cursor_start": "1970-01-01T00:00:00Z"})
        sid = schedule["id"]
        first = wait_run(stack, client, sid, run_now(client, sid)["id"])
        assert first["status"] == "succeeded", first
        assert first["task_count"] == 30 and first["counts"] == {"succeeded": 30, "failed": 0}
        assert first["cursor_before"] is None
        last = BASE + timedelta(seconds=30)
        assert datetime.fromisoformat(first["cursor_after"]) == last
        assert datetime.fromisoformat(client.get(f"/v1/schedules/{sid}").json()["cursor"]) == last

        # 5 new tickets, one touched without a change (same text: skipped), one edited (classified again)
        tickets(tickets_db, "INSERT INTO tickets VALUES (%s, %s, %s)",
                [(i, f"Ticket {i}: I cannot log in", BASE + timedelta(minutes=5, seconds=i)) for i in range(31, 36)])
        tickets(tickets_db, "UPDATE tickets SET updated_at = %s WHERE id = %s", [(BASE + timedelta(minutes=6), 1)])
        tickets(tickets_db, "UPDATE tickets SET body = %s, updated_at = %s WHERE id = %s",
                [("Ticket 2: the app crashes on start", BASE + timedelta(minutes=7), 2)])
        second = wait_run(stack, client, sid, run_now(client, sid)["id"])
        assert second["status"] == "succeeded", second
        assert second["source_counts"]["read"] == 7 and second["task_count"] == 6 and second["skipped_count"] == 1
        assert second["source_counts"]["already_classified"] == 1
        assert datetime.fromisoformat(second["cursor_before"]) == last
        assert datetime.fromisoformat(second["cursor_after"]) == BASE + timedelta(minutes=7)
        items = sorted(int(c["item_id"]) for c in classifications(client, sid, second["id"]))
        assert items == [2, 31, 32, 33, 34, 35]

        # nothing changed: nothing read
        third = wait_run(stack, client, sid, run_now(client, sid)["id"])
        assert third["source_counts"]["read"] == 0 and third["task_count"] == 0
        assert third["cursor_after"] == second["cursor_after"]

        # a failing query fails the run with the reason; the cursor stays where it was
        broken = client.patch(f"/v1/schedules/{sid}", json={"source": {
            **schedule["source"], "query": QUERY.replace("from tickets", "from no_such_table")}})
        assert broken.status_code == 200, broken.text
        failed = wait_run(stack, client, sid, run_now(client, sid)["id"])
        assert failed["status"] == "failed" and "source query failed" in failed["error"]
        assert "no_such_table" in failed["error"] and failed["job_id"] is None
        assert client.get(f"/v1/schedules/{sid}").json()["cursor"] == second["cursor_after"]

        # the cursor reset: every row is read again, and all of them were classified already
        reset = client.patch(f"/v1/schedules/{sid}", json={"source": schedule["source"], "cursor": None})
        assert reset.status_code == 200 and reset.json()["cursor"] is None
        again = wait_run(stack, client, sid, run_now(client, sid)["id"])
        assert again["status"] == "succeeded" and again["source_counts"]["read"] == 35
        assert again["task_count"] == 0 and again["skipped_count"] == 35
