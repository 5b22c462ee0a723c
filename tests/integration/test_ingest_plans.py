"""The statements that write a batch's lines read each chunk's lines once, however stale the statistics of
`tasks` are.

A batch's tasks are analyzed while they wait (`waiting_batch`, no batch), then moved to `in_batch` by the
claim; when the batch's lines come back the statistics still say no task is in any batch. Given that, the
planner expected one task to match the guard ("still in this batch") and, on a table small enough to scan,
looped over the tasks and read the whole chunk again for each one: a 50,000-line batch on a new
installation took minutes to ingest instead of seconds. Each test builds exactly that state and checks,
with EXPLAIN ANALYZE (rolled back), that the chunk's lines are read in one pass. (The statements that send
lines back or fail them read their lines in one pass too; their guard is a join condition the same way, so
they no longer read the batch's whole index for each chunk, which the last test checks.)

The last test runs the bulk statements as a long-lived worker connection ends up running them: prepared
(psycopg prepares a statement after a few executions) and by a generic plan, which Postgres may settle
on after a few more. Not planned for its months' range, a statement read every task of those months for
each chunk."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench._common import copy_rows, waiting_rows
from tests.support.stack import scratch_database
from tierbatch.db import bulk_sql
from tierbatch.db.partitions import months_spanned
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.tasks import transitions
from tierbatch.tasks.retention import remove_bodies

pytestmark = pytest.mark.integration

TASKS = 50_000  # a full batch
CHUNK = 10_000  # a whole chunk (`[batch] ingest_chunk_lines`)


@pytest.fixture(scope="module")
def own_database_url(base_database_url: str) -> Iterator[str]:
    """A database of this module's own: the rows each statement reads, and the plans that decide them, are
    those of the fixture's tasks alone, not of whatever other tests left in the month."""
    with scratch_database(base_database_url) as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture
def in_batch(own_database_url: str) -> Iterator[tuple[sa.Connection, uuid.UUID, list[uuid.UUID]]]:
    """A connection inside a transaction (rolled back) where TASKS tasks are `in_batch` in one batch, with
    the statistics taken while they were still waiting."""
    engine = sa.create_engine(own_database_url)
    tenant, batch = uuid.uuid4(), uuid.uuid4()
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            conn.execute(sa.text("INSERT INTO tenants (id, name) VALUES (:id, 'plans')"), {"id": tenant})
            conn.execute(sa.text("INSERT INTO provider_batches (id, provider, model, status, request_count, byte_size,"
                                 " attempts) VALUES (:id, 'sim', 'gpt-4o-mini', 'ingesting', :n, 0, 1)"),
                         {"id": batch, "n": TASKS})
            copy_rows(driver, "tasks", waiting_rows(tenant, TASKS, "sim", "gpt-4o-mini"))
            conn.execute(sa.text("ANALYZE tasks"))
            ids = list(conn.scalars(sa.text("UPDATE tasks SET status = 'in_batch', batch_id = :batch, attempts = 1 "
                                            "WHERE tenant_id = :tenant RETURNING id"),
                                    {"batch": batch, "tenant": tenant}))
            assert len(ids) == TASKS
            yield conn, batch, ids
            conn.rollback()
    finally:
        engine.dispose()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def explained(conn: sa.Connection, statement: sa.TextClause, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The executed plan's nodes (run inside a savepoint, undone)."""
    with conn.begin_nested() as savepoint:
        compiled = statement.compile(dialect=conn.dialect)
        raw = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled.string}",
                                   compiled.construct_params(params)).scalar_one()
        savepoint.rollback()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return list(_nodes(plan[0]["Plan"]))


def test_a_chunks_results_are_read_once_against_stale_statistics(
        in_batch: tuple[sa.Connection, uuid.UUID, list[uuid.UUID]]) -> None:
    conn, batch, ids = in_batch
    conn.execute(sa.text(bulk_sql.CREATE_INGEST_TABLE))
    conn.execute(sa.text(
        "INSERT INTO ingest_rows (id, status, served_model, output, input_tokens, cached_tokens, cache_write_tokens,"
        " output_tokens, reasoning_tokens, cost_usd, baseline_cost_usd)"
        " SELECT id, 'succeeded', 'gpt-4o-mini', 'ok', 10, 0, 0, 1, 0, 0.000001, 0.00001"
        " FROM unnest(CAST(:ids AS uuid[])) AS v(id)"), {"ids": ids[:CHUNK]})
    conn.execute(sa.text("ANALYZE ingest_rows (id)"))
    nodes = explained(conn, transitions.APPLY_INGEST_ROWS, {
        "batch": batch, "provider": "sim", "model": "gpt-4o-mini", "watch": [], **months_spanned(ids[:CHUNK])})
    scans = [n for n in nodes if n.get("Relation Name") == "ingest_rows"]
    assert scans, "the statement reads ingest_rows"
    assert [n["Actual Loops"] for n in scans] == [1] * len(scans)
    moved = next(n for n in nodes if n["Node Type"] == "ModifyTable" and n.get("Relation Name") == "tasks")
    assert moved["Actual Rows"] == CHUNK
    billed = next(n for n in nodes if n["Node Type"] == "ModifyTable" and n.get("Relation Name") == "ledger_entries")
    assert billed["Plans"][0]["Actual Rows"] == CHUNK  # each task moved is billed once


@pytest.mark.parametrize("statement", ["returned", "failed"])
def test_lines_sent_back_or_failed_are_read_once_against_stale_statistics(
        in_batch: tuple[sa.Connection, uuid.UUID, list[uuid.UUID]], statement: str) -> None:
    conn, batch, ids = in_batch
    sql = transitions.RETURN_LINES_TO_WAITING if statement == "returned" else transitions.FAIL_BATCH_LINES
    lines = ids[:CHUNK]
    params = {"ids": lines, "errors": ["expired"] * CHUNK, "max": 3, "batch": batch, **months_spanned(lines)}
    nodes = explained(conn, sql, params)
    scans = [n for n in nodes if n["Node Type"] == "Function Scan"]
    assert scans, "the statement reads its lines from unnest()"
    assert [n["Actual Loops"] for n in scans] == [1] * len(scans)
    assert sum(int(row[3]) for row in conn.execute(sql, params)) == CHUNK


LINES = 5_000  # a chunk of a tenth of the batch's (and the month's) 50,000 tasks


def tasks_read(conn: sa.Connection) -> int:
    """Rows of `tasks` read so far in this transaction: by sequential and by index scans, every partition."""
    return int(conn.execute(sa.text(
        "SELECT coalesce(sum(coalesce(s.seq_tup_read, 0) + coalesce(s.idx_tup_fetch, 0)), 0)"
        " FROM pg_stat_xact_user_tables AS s JOIN pg_inherits AS i ON i.inhrelid = s.relid"
        " WHERE i.inhparent = CAST('tasks' AS regclass)")).scalar_one())


def test_bulk_statements_read_their_lines_only_when_prepared_and_run_by_a_generic_plan(
        in_batch: tuple[sa.Connection, uuid.UUID, list[uuid.UUID]]) -> None:
    conn, batch, ids = in_batch
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    driver.prepare_threshold = 0  # every statement prepared on its first execution
    conn.execute(sa.text("SET plan_cache_mode = force_generic_plan"))  # rolled back with the fixture
    session = Session(bind=conn)
    errors = {task_id: "expired" for task_id in ids[:LINES]}

    def reads(operation: str, run: Any) -> int:
        before = tasks_read(conn)
        moved = run()
        read = tasks_read(conn) - before
        assert moved == LINES, f"{operation} moved {moved} tasks"
        return read

    read = {}
    conn.execute(sa.text(bulk_sql.CREATE_INGEST_TABLE))
    conn.execute(sa.text(
        "INSERT INTO ingest_rows (id, status, served_model, output, input_tokens, cached_tokens, cache_write_tokens,"
        " output_tokens, reasoning_tokens, cost_usd, baseline_cost_usd)"
        " SELECT id, 'succeeded', 'gpt-4o-mini', 'ok', 10, 0, 0, 1, 0, 0.000001, 0.00001"
        " FROM unnest(CAST(:ids AS uuid[])) AS v(id)"), {"ids": ids[LINES:2 * LINES]})
    conn.execute(sa.text("ANALYZE ingest_rows (id)"))
    read["ingest"] = reads("ingestion", lambda: int(transitions.apply_ingested_rows(
        conn, batch, "sim", "gpt-4o-mini", ids[LINES:2 * LINES], []).written))
    read["return"] = reads("returning lines", lambda: transitions.return_lines_to_waiting(session, batch, errors, 3))
    second = uuid.uuid4()
    conn.execute(sa.text("INSERT INTO provider_batches (id, provider, model, status, request_count, byte_size,"
                         " attempts) VALUES (:id, 'sim', 'gpt-4o-mini', 'preparing', :n, 0, 0)"),
                 {"id": second, "n": LINES})
    read["claim"] = reads("the claim", lambda: transitions.claim_for_batch(session, second, list(errors)))
    read["fail"] = reads("failing lines", lambda: transitions.fail_batch_lines(session, second, errors))
    read["retention"] = reads("retention", lambda: remove_bodies(session, datetime.now(UTC) + timedelta(hours=1),
                                                                    LINES))
    # each task looked up by its id (its row versions of this transaction included), not every task of its
    # month (planned over the range alone, ingestion read all 50,000 for 5,000 lines) or of its batch
    # (returning lines read the batch's index while its guard was a filter of `tasks`)
    assert {operation: n for operation, n in read.items() if n >= TASKS // 2} == {}, read
