"""Each hand-written bulk statement runs against the migrated schema (with no rows, rolled back): Postgres
resolves every column, type and cast, which a mismatch with the migrations would fail."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from tests.support.stack import psycopg_dsn
from tierbatch.base.ids import Month, id_time, new_task_ids
from tierbatch.db import bulk_sql
from tierbatch.db.partitions import months_spanned
from tierbatch.tasks import retention, transitions

NO_ID: list[str] = []


@pytest.fixture
def connection(migrated_database_url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(migrated_database_url)
    try:
        with engine.connect() as conn:
            yield conn
            conn.rollback()
    finally:
        engine.dispose()


def test_copy_tasks_takes_its_columns(migrated_database_url: str) -> None:
    with psycopg.connect(psycopg_dsn(migrated_database_url)) as conn:
        with conn.cursor() as cursor, cursor.copy(bulk_sql.COPY_TASKS):
            pass
        conn.rollback()


def test_ingestion_statements_run(connection: sa.Connection) -> None:
    connection.execute(sa.text(bulk_sql.CREATE_INGEST_TABLE))
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    with driver.cursor() as cursor, cursor.copy(bulk_sql.COPY_INGEST_ROWS):
        pass
    row = transitions.apply_ingested_rows(connection, uuid.uuid4(), "p", "m", (), ())
    assert row.written == 0
    # the temp table's types are those of the columns it feeds (numerics aside: the target has the scale)
    mirrored = connection.execute(sa.text(
        "SELECT v.attname, format_type(v.atttypid, NULL) AS temp, "
        " coalesce(format_type(t.atttypid, NULL), format_type(l.atttypid, NULL)) AS target "
        "FROM pg_attribute AS v "
        "LEFT JOIN pg_attribute AS t ON t.attrelid = 'tasks'::regclass AND t.attname = v.attname "
        "LEFT JOIN pg_attribute AS l ON l.attrelid = 'ledger_entries'::regclass AND l.attname = v.attname "
        "WHERE v.attrelid = 'ingest_rows'::regclass AND v.attnum > 0 AND NOT v.attisdropped")).all()
    assert [r.attname for r in mirrored] == list(bulk_sql.INGEST_COLUMNS)
    assert [(r.attname, r.temp) for r in mirrored] == [(r.attname, r.target) for r in mirrored]


def test_shadow_insert_runs(connection: sa.Connection) -> None:
    result = connection.execute(bulk_sql.QUEUE_SHADOW_TASKS, {"ids": NO_ID, "shadow_ids": NO_ID, "tiers": NO_ID,
                                                              "kinds": NO_ID, "providers": NO_ID, "models": NO_ID})
    assert result.rowcount == 0


def test_gateway_write_runs(migrated_database_url: str) -> None:
    with psycopg.connect(psycopg_dsn(migrated_database_url)) as conn:
        conn.execute(bulk_sql.GATEWAY_WRITE, {"tasks": "[]", "ledger": "[]"})
        conn.rollback()


def test_gateway_write_with_positional_placeholders_prepares_and_runs(migrated_database_url: str) -> None:
    """The call writer prepares this form on its connection: $1 the task rows, $2 the ledger rows."""
    with psycopg.connect(psycopg_dsn(migrated_database_url)) as conn:
        conn.execute(f"PREPARE positional_gateway_write AS {bulk_sql.GATEWAY_WRITE_POSITIONAL}")
        conn.execute("EXECUTE positional_gateway_write('[]', '[]')")
        conn.rollback()


def _partitions_updated(connection: sa.Connection, statement: sa.TextClause, params: dict[str, object]) -> set[str]:
    """The partitions of `tasks` the statement's plan writes to (the others are pruned at planning)."""
    explain = sa.text("EXPLAIN " + statement.text).bindparams(*statement._bindparams.values())
    plan = "\n".join(connection.execute(explain, params).scalars())
    return set(re.findall(r"Update on (tasks_\w+)", plan))


def test_updates_by_id_are_planned_over_their_month_only(connection: sa.Connection) -> None:
    """A task's row is read and written in its month's partition alone: by id, or, for the statements joined
    to a temp table or an array of ids, by the range of the months those ids fall in."""
    ids = new_task_ids(3)
    month = f"tasks_{Month.of(id_time(ids[0]))}"
    assert _partitions_updated(connection, sa.text("UPDATE tasks SET updated_at = now() WHERE id = :id"),
                               {"id": ids[0]}) == {month}
    connection.execute(sa.text(bulk_sql.CREATE_INGEST_TABLE))
    assert _partitions_updated(connection, transitions.APPLY_INGEST_ROWS, {
        "batch": uuid.uuid4(), "provider": "p", "model": "m", "watch": [], **months_spanned(ids)}) == {month}
    assert _partitions_updated(connection, retention._REMOVE, {
        "ids": ids, "kept": [None] * 3, **months_spanned(ids)}) == {month}
