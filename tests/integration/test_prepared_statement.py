"""`tierbatch.db.prepared`: a statement prepared on a psycopg async connection and run over its libpq
handle, against a real Postgres: its rows land as sent, the server's errors come back as psycopg's
class for their SQLSTATE (the connection still usable), and a connection killed under it raises
OperationalError rather than hanging. The gateway's call writer, which prepares its statement on each
connection it opens, closes that connection when preparing fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest

from tests.support.stack import psycopg_dsn, scratch_database
from tierbatch.db.prepared import PreparedStatement
from tierbatch.gateway.recorder import CallWriter

pytestmark = pytest.mark.anyio

INSERT = PreparedStatement("test_insert_note", "INSERT INTO notes (id, body) SELECT $1::int, $2::text")


@pytest.fixture
async def connection(migrated_database_url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    conn = await psycopg.AsyncConnection.connect(psycopg_dsn(migrated_database_url), autocommit=True)
    try:
        await conn.execute("CREATE TEMPORARY TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        await INSERT.prepare(conn)
        yield conn
    finally:
        await conn.close()


async def bodies(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> dict[object, object]:
    cursor = await conn.execute("SELECT id, body FROM notes ORDER BY id")
    return {row[0]: row[1] for row in await cursor.fetchall()}


async def test_rows_land_as_sent_including_text_larger_than_a_socket_buffer(
        connection: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    large = "ü€ ✓ " * 400_000  # ~4 MB: sent in several flushes
    await INSERT.run(connection, ("1", "a note: café, 漢字, \\u0041 and 'quotes'"))
    await INSERT.run(connection, ("2", large))
    assert await bodies(connection) == {1: "a note: café, 漢字, \\u0041 and 'quotes'", 2: large}


async def test_a_server_error_raises_its_sqlstate_class_and_the_connection_stays_usable(
        connection: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    await INSERT.run(connection, ("1", "first"))
    with pytest.raises(psycopg.errors.UniqueViolation, match="notes_pkey"):
        await INSERT.run(connection, ("1", "again"))
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        await INSERT.run(connection, ("not a number", "x"))
    await INSERT.run(connection, ("2", "second"))
    assert await bodies(connection) == {1: "first", 2: "second"}


async def test_running_before_preparing_is_refused_by_the_server(migrated_database_url: str) -> None:
    other = PreparedStatement("test_never_prepared", "SELECT $1::int")
    async with await psycopg.AsyncConnection.connect(psycopg_dsn(migrated_database_url), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            await other.run(conn, ("1",))


async def test_a_connection_killed_under_it_raises_operational_error(
        connection: psycopg.AsyncConnection[tuple[object, ...]], migrated_database_url: str) -> None:
    pid = connection.pgconn.backend_pid
    with psycopg.connect(psycopg_dsn(migrated_database_url), autocommit=True) as killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        await INSERT.run(connection, ("1", "lost"))


async def test_the_call_writer_leaves_no_connection_behind_when_preparing_fails(base_database_url: str) -> None:
    """A database without the schema (say, mid-migration): the writer's statement cannot be prepared, the
    write raises, and the connection it opened for it is closed, write after write."""
    with scratch_database(base_database_url, prefix="tierbatch_noschema") as empty:
        writer = CallWriter(psycopg_dsn(empty))
        for _ in range(3):
            with pytest.raises(psycopg.errors.UndefinedTable):
                await writer.write([])
        await writer.aclose()
        with psycopg.connect(psycopg_dsn(base_database_url), autocommit=True) as watcher:
            row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                  (psycopg.conninfo.conninfo_to_dict(psycopg_dsn(empty))["dbname"],)).fetchone()
        assert row == (0,)
