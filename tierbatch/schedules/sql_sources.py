"""SQL sources: a query on a database the operator declared, read as a stream; and the cursors of incremental runs.

A source is declared in `[sources.NAME]` (the environment variable holding its URL, the tenants allowed, a
statement timeout, a row cap). The query runs in a read-only transaction, as one statement through a
server-side cursor (so no second statement can follow it). Incremental by a cursor column: the query binds
`:cursor` (the largest cursor value of the previous run, or `cursor_start` the first time) and the run
keeps the largest value it read.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Generator, Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from tierbatch.base.config import SqlSourceConfig
from tierbatch.schedules.source_rows import SourceError, SourceRow, item_id_of, item_text_of

log = logging.getLogger(__name__)

SQL_FETCH_ROWS = 2000


def sqlalchemy_url(raw: str) -> str:
    """Plain `postgres://` / `postgresql://` URLs are read with psycopg 3 (the driver we ship)."""
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix):]
    return raw


def _same_database(a: str, b: str) -> bool:
    try:
        left, right = make_url(sqlalchemy_url(a)), make_url(sqlalchemy_url(b))
    except ArgumentError:
        return False
    return (left.get_backend_name() == right.get_backend_name() and (left.host or "") == (right.host or "")
            and (left.port or 5432) == (right.port or 5432) and left.database == right.database)


def unavailable(name: str) -> SourceError:
    # the same words whatever the cause, so that a tenant learns nothing of the worker's environment
    return SourceError(f"source {name} is not available (ask the operator)")


def source_url(name: str, source: SqlSourceConfig, environ: Mapping[str, str], own_database_url: str | None
               ) -> str:
    raw = (environ.get(source.url_env) or "").strip()
    if not raw:
        log.warning("SQL source %s: the environment variable %s is not set in the worker", name, source.url_env)
        raise unavailable(name)
    if own_database_url and _same_database(raw, own_database_url):
        log.warning("SQL source %s: %s points at tierbatch's own database, which is refused", name, source.url_env)
        raise unavailable(name)
    return sqlalchemy_url(raw)


def _read_only(connection: Connection, name: str, timeout_seconds: float) -> Connection:
    """The connection in a read-only transaction whose statements stop after `timeout_seconds`."""
    backend = connection.dialect.name
    if backend == "postgresql":
        connection = connection.execution_options(postgresql_readonly=True)  # BEGIN READ ONLY
        connection.execute(text("SET TRANSACTION READ ONLY"))
        connection.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                           {"ms": str(max(1, int(timeout_seconds * 1000)))})
        return connection
    if backend == "sqlite":
        raw = connection.connection.driver_connection
        assert raw is not None
        raw.execute("PRAGMA query_only = ON")
        deadline = time.monotonic() + timeout_seconds
        raw.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
        return connection
    log.warning("SQL source %s: backend %s cannot be made read-only; refused", name, backend)
    raise unavailable(name)


def read_sql(spec: Mapping[str, Any], cursor: Any, source: SqlSourceConfig, environ: Mapping[str, str],
             own_database_url: str | None = None) -> Generator[SourceRow, None, None]:
    """The query's rows through a server-side cursor in a read-only transaction; `:cursor` is bound to
    `cursor` when the query has it. More than the source's `max_rows` rows fails the run."""
    name = str(spec["source"])
    url = source_url(name, source, environ, own_database_url)
    id_field, text_field = str(spec.get("id_field", "id")), str(spec.get("text_field", "text"))
    cursor_field = spec.get("cursor_field")
    query = str(spec["query"])
    params = {"cursor": cursor} if ":cursor" in query else {}
    try:
        engine = create_engine(url, poolclass=pool.NullPool)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        log.warning("SQL source %s: not a usable database URL (%s)", name, type(exc).__name__)
        raise unavailable(name) from None
    try:
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            log.warning("SQL source %s: cannot connect: %s", name, str(getattr(exc, "orig", None) or exc)[:300])
            raise unavailable(name) from None
        with connection:
            reading = _read_only(connection, name, source.statement_timeout_seconds)
            # one statement only: a server-side cursor (DECLARE … FOR) takes a single SELECT
            result = reading.execution_options(stream_results=True, yield_per=SQL_FETCH_ROWS).execute(
                text(query), params)
            columns = list(result.keys())
            missing = [f for f in (id_field, text_field, cursor_field) if f and f not in columns]
            if missing:
                raise SourceError(f"source query: the result has no column {missing[0]!r} "
                                  f"(columns: {', '.join(columns)})")
            for number, row in enumerate(result.mappings(), start=1):
                if source.max_rows is not None and number > source.max_rows:
                    raise SourceError(f"source {name}: the query returned more than {source.max_rows} rows (the "
                                      "source's max_rows); narrow it, e.g. with a cursor, or ask the operator")
                where = f"source query row {number}"
                yield SourceRow(item_id_of(row[id_field], where, id_field),
                                item_text_of(row[text_field], where, text_field),
                                row[cursor_field] if cursor_field else None)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SourceError(f"source query failed: {detail}") from None
    finally:
        engine.dispose()


# --- cursors: stored as JSON with their type, bound again as that type --------------------------------

def encode_cursor(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return {"type": "datetime", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, bool):
        return {"type": "str", "value": str(value).lower()}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, Decimal):
        return {"type": "decimal", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    return {"type": "str", "value": str(value)}


def decode_cursor(stored: Mapping[str, Any] | None) -> Any:
    if not stored:
        return None
    kind, value = stored.get("type"), stored.get("value")
    if value is None:
        return None
    if kind == "datetime":
        return dt.datetime.fromisoformat(str(value))
    if kind == "date":
        return dt.date.fromisoformat(str(value))
    if kind == "int":
        return int(value)
    if kind == "decimal":
        return Decimal(str(value))
    if kind == "float":
        return float(value)
    return value


def cursor_json(stored: Mapping[str, Any] | None) -> Any:
    """The stored cursor as a user sees it (the value)."""
    return None if not stored else stored.get("value")


class CursorTracker:
    """The largest cursor value read so far."""

    def __init__(self) -> None:
        self.value: Any = None

    def see(self, value: Any) -> None:
        if value is None:
            return
        try:
            if self.value is None or value > self.value:
                self.value = value
        except TypeError:
            raise SourceError(f"source query: cursor values of different types ({self.value!r}, {value!r})") from None
