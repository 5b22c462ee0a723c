"""Where a scheduled run's items come from (DESIGN §8 schedules): files and SQL queries, read as streams.

- **file**: a path or a glob (every match, in name order), JSONL or CSV (by extension, or `format`),
  with configurable id and text fields. Read row by row; memory does not grow with the file.
- **sql**: a query on a database whose URL is in an environment variable *named* by the schedule (the
  URL itself is never stored). Incremental by a cursor column: the query binds `:cursor` (the largest
  cursor value of the previous run, or `cursor_start` the first time) and the run keeps the largest
  value it read. Rows come through a server-side cursor.

Everything that can go wrong at fire time (no such file, a bad row, an unset variable, a failing
query) raises `SourceError` with a reason for the run; nothing here writes to our database.
"""

from __future__ import annotations

import csv
import datetime as dt
import glob
import json
import os
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

CSV_FIELD_LIMIT = 16 * 1024 * 1024
SQL_FETCH_ROWS = 2000
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES = (".csv", ".tsv")


class SourceError(Exception):
    """The source cannot be read; the run fails with this reason."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    item_id: str
    text: str | None  # None: nothing to classify (empty or missing text); the row is skipped
    cursor: Any = None


# --- files -------------------------------------------------------------------------------------------

def has_glob(path: str) -> bool:
    return glob.has_magic(path)


def check_under_roots(path: str, roots: Sequence[str], what: str) -> None:
    """When roots are configured, a path must resolve inside one of them (no `..` escapes, no symlinks out)."""
    if not roots:
        return
    resolved = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep):
            return
    raise SourceError(f"{what}: {path} is outside the allowed directories ({', '.join(roots)})")


def source_roots() -> list[str]:
    """Directories file sources and sinks must stay in (`TIERBATCH_SOURCE_ROOTS`, os.pathsep-separated)."""
    raw = os.environ.get("TIERBATCH_SOURCE_ROOTS", "")
    return [r for r in raw.split(os.pathsep) if r.strip()]


def file_format(path: str, explicit: str) -> str:
    if explicit != "auto":
        return explicit
    suffix = Path(path).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    raise SourceError(f"{path}: cannot tell the format from the extension {suffix!r}; set source.format")


def matching_files(pattern: str, roots: Sequence[str] = ()) -> list[str]:
    if has_glob(pattern):
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not paths:
            raise SourceError(f"source file: no file matches {pattern}")
    else:
        if not os.path.exists(pattern):
            raise SourceError(f"source file: {pattern} does not exist")
        if not os.path.isfile(pattern):
            raise SourceError(f"source file: {pattern} is not a regular file")
        paths = [pattern]
    for path in paths:
        check_under_roots(path, roots, "source.path")
    return paths


def _id_of(value: Any, where: str, id_field: str) -> str:
    if isinstance(value, bool) or value is None:
        raise SourceError(f"{where}: field {id_field!r} is missing or not a string or integer")
    if isinstance(value, int | uuid.UUID | Decimal):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where}: field {id_field!r} must be a non-empty string or an integer")
    return value


def _text_of(value: Any, where: str, text_field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where}: field {text_field!r} must be a string")
    return value if value.strip() else None


def read_jsonl(path: str, id_field: str, text_field: str) -> Iterator[SourceRow]:
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{where}: each line must be a JSON object")
            if id_field not in record:
                raise SourceError(f"{where}: no {id_field!r} field (source.id_field)")
            yield SourceRow(_id_of(record[id_field], where, id_field),
                            _text_of(record.get(text_field), where, text_field))


def read_csv(path: str, id_field: str, text_field: str) -> Iterator[SourceRow]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise SourceError(f"{path}: bad CSV header ({exc})") from None
        if not header:
            raise SourceError(f"{path}: the file is empty (a header with {id_field!r} and {text_field!r} is needed)")
        missing = [f for f in (id_field, text_field) if f not in header]
        if missing:
            raise SourceError(f"{path}: the CSV header has no column {missing[0]!r} (columns: {', '.join(header)})")
        start = reader.line_num + 1
        try:
            for row in reader:
                where = f"{path}:{start}"
                yield SourceRow(_id_of(row.get(id_field) or None, where, id_field),
                                _text_of(row.get(text_field), where, text_field))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise SourceError(f"{path}:{reader.line_num}: bad CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: not UTF-8 text ({exc.reason})") from None


def read_files(spec: Mapping[str, Any], roots: Sequence[str] = ()) -> Generator[SourceRow, None, None]:
    """Every row of every file the path or glob matches, in file-name order."""
    paths = matching_files(str(spec["path"]), roots)
    id_field, text_field = str(spec.get("id_field", "id")), str(spec.get("text_field", "text"))
    explicit = str(spec.get("format", "auto"))
    for path in paths:
        kind = file_format(path, explicit)
        try:
            if kind == "csv":
                yield from read_csv(path, id_field, text_field)
            else:
                yield from read_jsonl(path, id_field, text_field)
        except OSError as exc:
            raise SourceError(f"source file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise SourceError(f"source file {path}: not UTF-8 text ({exc.reason})") from None


# --- SQL ---------------------------------------------------------------------------------------------

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


def source_url(spec: Mapping[str, Any], environ: Mapping[str, str], own_database_url: str | None) -> str:
    name = str(spec["url_env"])
    raw = environ.get(name)
    if raw is None or not raw.strip():
        raise SourceError(f"source.url_env: the environment variable {name} is not set in the worker")
    if own_database_url and _same_database(raw, own_database_url):
        raise SourceError(f"source.url_env: {name} points at tierbatch's own database, which is not allowed")
    return sqlalchemy_url(raw.strip())


def read_sql(spec: Mapping[str, Any], cursor: Any, environ: Mapping[str, str],
             own_database_url: str | None = None) -> Generator[SourceRow, None, None]:
    """The query's rows through a server-side cursor; `:cursor` is bound to `cursor` when the query has it."""
    url = source_url(spec, environ, own_database_url)
    id_field, text_field = str(spec.get("id_field", "id")), str(spec.get("text_field", "text"))
    cursor_field = spec.get("cursor_field")
    query = str(spec["query"])
    params = {"cursor": cursor} if ":cursor" in query else {}
    name = spec["url_env"]
    try:
        engine = create_engine(url, poolclass=pool.NullPool)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise SourceError(f"source.url_env: {name} is not a usable database URL ({exc})") from None
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=SQL_FETCH_ROWS).execute(
                text(query), params)
            columns = list(result.keys())
            missing = [f for f in (id_field, text_field, cursor_field) if f and f not in columns]
            if missing:
                raise SourceError(f"source query: the result has no column {missing[0]!r} "
                                  f"(columns: {', '.join(columns)})")
            for number, row in enumerate(result.mappings(), start=1):
                where = f"source query row {number}"
                yield SourceRow(_id_of(row[id_field], where, id_field), _text_of(row[text_field], where, text_field),
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
