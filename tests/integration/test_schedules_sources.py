"""A SQL source in a second database on the same server, declared by the operator (`[sources.tickets]`
of the session stack's config, granted to tenants named `sql-reader`), read incrementally by a cursor
column across runs; the worker gets the source URL from the environment variable the config names.
What a hostile tenant tries: naming an environment variable, a source granted to others, writing
through the query, a query that never ends, a query that reads everything."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
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
    """The stack's worker restarted with TB_TEST_TICKETS_DB_URL set (a plain postgresql:// URL), then restored."""
    stack = sim_reset
    stack.processes["worker"].kill()
    try:
        stack.start_worker({"TB_TEST_TICKETS_DB_URL": psycopg_dsn(tickets_db)})
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
    with stack.client(stack.new_tenant_key("sql-reader")) as client:
        schedule = create_schedule(client, name="sql-tickets", cron="0 2 * * *", timezone="Europe/Paris",
                                   enabled=False, job={**JOB, "urgent": True}, source={
                                       "type": "sql", "source": "tickets", "query": QUERY, "id_field": "id",
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


def sql_schedule(client: httpx.Client, query: str, source: str = "tickets", **fields: Any) -> dict[str, Any]:
    return create_schedule(client, name=f"sql-{uuid.uuid4().hex[:6]}", cron="0 2 * * *", enabled=False,
                           job={**JOB, "urgent": True}, source={"type": "sql", "source": source, "query": query,
                                                                "id_field": "id", "text_field": "body", **fields})


def test_a_schedule_names_a_granted_source_never_an_environment_variable(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key("sql-reader")) as reader, \
            stack.client(stack.new_tenant_key("someone")) as other:
        base = {"name": "s", "cron": "0 2 * * *", "job": JOB}
        for body_source in ({"type": "sql", "url_env": "TB_TEST_TICKETS_DB_URL", "query": "select 1"},
                            {"type": "sql", "url_env": "HOME", "query": "select 1"},
                            {"type": "sql", "source": "tickets", "url_env": "HOME", "query": "select 1"}):
            refused = reader.post("/v1/schedules", json={**base, "source": body_source})
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "source.url_env", refused.text

        # a source that does not exist and one granted to other tenants: the same answer
        answers = {}
        for client, name in ((reader, "finance"), (reader, "no-such-source"), (other, "tickets")):
            response = client.post("/v1/schedules", json={**base, "source": {"type": "sql", "source": name,
                                                                             "query": "select 1"}})
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["param"] == "source.source"
            assert "TB_TEST_TICKETS_DB_URL" not in response.text
            answers[name] = error["message"].replace(repr(name), "NAME")
        assert len(set(answers.values())) == 1, answers
        assert reader.get("/v1/schedules").json()["data"] == [] and other.get("/v1/schedules").json()["data"] == []


def test_queries_are_read_only_time_limited_and_capped(worker_with_source: Stack, tickets_db: str) -> None:
    stack = worker_with_source
    tickets(tickets_db, "INSERT INTO tickets VALUES (%s, %s, %s)",
            [(i, f"Ticket {i}: the invoice is wrong", BASE + timedelta(seconds=i)) for i in range(1, 31)])
    with psycopg.connect(psycopg_dsn(tickets_db), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION add_ticket() RETURNS TABLE(id integer, body text) LANGUAGE sql AS "
                     "$$ INSERT INTO tickets VALUES (999, 'planted', now()) RETURNING id, body $$")

    def table() -> list[tuple[Any, ...]]:
        with psycopg.connect(psycopg_dsn(tickets_db)) as conn:
            return conn.execute("SELECT id, body, updated_at FROM tickets ORDER BY id").fetchall()

    before = table()
    with stack.client(stack.new_tenant_key("sql-reader")) as client:
        writes = ["INSERT INTO tickets VALUES (500, 'x', now()) RETURNING id, body",
                  "UPDATE tickets SET body = 'changed' RETURNING id, body",
                  "SELECT id, body FROM tickets; DELETE FROM tickets",
                  "WITH gone AS (DELETE FROM tickets RETURNING id, body) SELECT id, body FROM gone",
                  "SELECT * FROM add_ticket()"]
        for query in writes:
            schedule = sql_schedule(client, query)
            run = wait_run(stack, client, schedule["id"], run_now(client, schedule["id"])["id"])
            assert run["status"] == "failed" and run["job_id"] is None, (query, run)
            assert run["error"].startswith("source query failed"), run["error"]
        assert table() == before  # nothing written, nothing deleted
        function = sql_schedule(client, "SELECT * FROM add_ticket()")
        run = wait_run(stack, client, function["id"], run_now(client, function["id"])["id"])
        assert "read-only transaction" in run["error"]

        # the source's statement timeout is 1 s: a query sleeping 5 s is stopped
        slow = sql_schedule(client, "SELECT 1 AS id, 'x' AS body FROM pg_sleep(5)")
        started = datetime.now(UTC)
        run = wait_run(stack, client, slow["id"], run_now(client, slow["id"])["id"])
        assert run["status"] == "failed" and "statement timeout" in run["error"], run
        assert datetime.fromisoformat(run["finished_at"]) - started < timedelta(seconds=4.5)

        # tickets_capped reads at most 10 rows: 30 fail the run, nothing is classified, the cursor stays
        capped = sql_schedule(client, QUERY, source="tickets_capped", cursor_field="updated_at",
                              cursor_start="1970-01-01T00:00:00Z")
        run = wait_run(stack, client, capped["id"], run_now(client, capped["id"])["id"])
        assert run["status"] == "failed" and "more than 10 rows" in run["error"], run
        assert run["task_count"] == 0 and run["job_id"] is None
        assert client.get(f"/v1/schedules/{capped['id']}").json()["cursor"] is None
        assert classifications(client, capped["id"], run["id"]) == []
        narrow = client.patch(f"/v1/schedules/{capped['id']}", json={"source": {
            **capped["source"], "cursor_start": (BASE + timedelta(seconds=25)).isoformat()}})
        assert narrow.status_code == 200, narrow.text
        run = wait_run(stack, client, capped["id"], run_now(client, capped["id"])["id"])
        assert run["status"] == "succeeded" and run["task_count"] == 5, run
