"""Where a scheduled run's items come from: files and SQL queries, read as streams.

- **file**: a path or a glob relative to the tenant's own directory `<[files] root>/<tenant id>/`
  (every match, in name order), or a file the tenant uploaded (`POST /v1/files`, purpose `user_data`);
  JSONL or CSV (by extension, or `format`), with configurable id and text fields. Read row by row;
  memory does not grow with the file. Paths are walked one directory at a time from the tenant's
  directory with `O_NOFOLLOW`: no `..`, no absolute path, no symbolic link is ever followed, so nothing
  outside that directory is read, whatever was placed in it after the schedule was created.
- **sql**: a query on a database the operator declared (`[sources.NAME]`: the environment variable
  holding its URL, the tenants allowed, a statement timeout, a row cap). It runs in a read-only
  transaction, as one statement through a server-side cursor (so no second statement can follow it).
  Incremental by a cursor column: the query binds `:cursor` (the largest cursor value of the previous
  run, or `cursor_start` the first time) and the run keeps the largest value it read.

Everything that can go wrong at fire time (no such file, a bad row, an unavailable source, a failing
query) raises `SourceError` with a reason for the run. A reason never quotes a file's content (no header,
no line), and never names an environment variable; nothing here writes to our database.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fnmatch
import glob
import io
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from sqlalchemy import create_engine, pool, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from tierbatch.base.config import SqlSourceConfig
from tierbatch.db.models import FilePart, StoredFile

log = logging.getLogger(__name__)

CSV_FIELD_LIMIT = 16 * 1024 * 1024
SQL_FETCH_ROWS = 2000
USER_DATA = "user_data"
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES = (".csv", ".tsv")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone left there must not hang the worker (a regular file ignores it)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class SourceError(Exception):
    """The source cannot be read; the run fails with this reason."""


class PathRefused(SourceError):
    """A tenant's path that would leave its directory (absolute, `..`, a symbolic link) or is malformed."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    item_id: str
    text: str | None  # None: nothing to classify (empty or missing text); the row is skipped
    cursor: Any = None


# --- the tenant's directory ----------------------------------------------------------------------------

def has_glob(path: str) -> bool:
    return glob.has_magic(path)


def path_parts(path: str) -> list[str]:
    """The components of a tenant's relative path; PathRefused when it is absolute or climbs with `..`."""
    if "\x00" in path:
        raise PathRefused("must not contain NUL characters")
    if path.startswith("/") or os.path.isabs(path) or path.startswith("~"):
        raise PathRefused("must be relative to your own files directory (<[files] root>/<tenant id>/), "
                          "e.g. 'tickets/*.csv', not an absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathRefused("must not contain '..': a path stays inside your own files directory")
    if not parts:
        raise PathRefused("names no file")
    return parts


@dataclass(frozen=True, slots=True)
class TenantFiles:
    """`<root>/<tenant id>/`: the only directory a tenant's file sources and sinks can touch."""

    root: Path
    tenant_id: uuid.UUID

    @property
    def directory(self) -> Path:
        return self.root / str(self.tenant_id)

    def open_directory(self, create: bool = False) -> int:
        """A descriptor of the tenant's directory (made when `create`); the operator's root may be a link."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            name = str(self.tenant_id)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o750, dir_fd=root_fd)
            return _open_dir(root_fd, name, "your files directory")
        finally:
            os.close(root_fd)

    def probe(self, path: str, *, dynamic: Callable[[str], bool] = has_glob) -> None:
        """At creation: PathRefused when an existing part of `path` is a symbolic link. The parts from the
        first `dynamic` one (a glob, a placeholder) on are checked when the run reads or writes them."""
        parts = path_parts(path)
        current = self.directory
        for part in [None, *parts]:
            if part is not None:
                if dynamic(part):
                    return
                current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return  # not there yet: checked again when the run reads or writes it
            except OSError as exc:
                raise PathRefused(f"{path!r} cannot be checked ({exc.strerror})") from None
            if stat.S_ISLNK(mode):
                raise PathRefused(f"{path!r} goes through a symbolic link, which is not allowed: a path must "
                                  "stay inside your own files directory")


def _open_dir(parent_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise SourceError(f"{shown} does not exist") from None
    except OSError as exc:
        raise _refusal(parent_fd, name, shown, exc) from None


def _refusal(parent_fd: int, name: str, shown: str, exc: OSError) -> SourceError:
    """Why `name` could not be opened without following links: a link, a non-directory, or the OS reason."""
    try:
        mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
    except OSError:
        return SourceError(f"{shown}: {exc.strerror or 'cannot be opened'}")
    if stat.S_ISLNK(mode):
        return PathRefused(f"{shown} is a symbolic link, which is not allowed: a path must stay inside your "
                           "own files directory")
    if not stat.S_ISDIR(mode):
        return SourceError(f"{shown} is not a directory")
    return SourceError(f"{shown}: {exc.strerror or 'cannot be opened'}")


def walk_directories(dir_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """The descriptor of `parts` under `dir_fd`, each opened with O_NOFOLLOW (made when `create`).
    `dir_fd` stays open; the caller closes the result (which may be a new descriptor)."""
    current = os.dup(dir_fd)
    try:
        for index, part in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
            following = _open_dir(current, part, "/".join(parts[:index + 1]))
            os.close(current)
            current = following
        return current
    except BaseException:
        os.close(current)
        raise


def open_tenant_file(files: TenantFiles, path: str) -> IO[bytes]:
    """The regular file at `path` inside the tenant's directory, for reading, no link followed."""
    parts = path_parts(path)
    try:
        top = files.open_directory()
    except FileNotFoundError:
        raise SourceError(f"source file: {path} does not exist") from None
    try:
        parent = walk_directories(top, parts[:-1])
    finally:
        os.close(top)
    try:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise SourceError(f"source file: {path} does not exist") from None
        except OSError as exc:
            raise _refusal(parent, parts[-1], f"source file: {path}", exc) from None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"source file: {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _glob(dir_fd: int, parts: Sequence[str], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Matches of `parts` under `dir_fd`: symbolic links are invisible, hidden names need a leading `.`."""
    head, rest = parts[0], parts[1:]
    if has_glob(head):
        with os.scandir(dir_fd) as entries:
            names = sorted(e.name for e in entries if fnmatch.fnmatchcase(e.name, head)
                           and (head.startswith(".") or not e.name.startswith(".")))
    else:
        names = [head]
    for name in names:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            continue
        if not rest:
            if stat.S_ISREG(mode):
                yield (*prefix, name)
        elif stat.S_ISDIR(mode):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                yield from _glob(child, rest, (*prefix, name))
            finally:
                os.close(child)


def matching_files(files: TenantFiles, pattern: str) -> list[str]:
    """The tenant-relative paths a source path names: itself, or every match of its glob in name order."""
    parts = path_parts(pattern)
    if not has_glob(pattern):
        return ["/".join(parts)]
    try:
        top = files.open_directory()
    except FileNotFoundError:
        raise SourceError(f"source file: no file matches {pattern}") from None
    try:
        found = sorted("/".join(match) for match in _glob(top, parts, ()))
    finally:
        os.close(top)
    if not found:
        raise SourceError(f"source file: no file matches {pattern}")
    return found


def file_format(name: str, explicit: str) -> str:
    if explicit != "auto":
        return explicit
    suffix = Path(name).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    raise SourceError(f"{name}: cannot tell the format from the extension {suffix!r}; set source.format")


# --- rows ----------------------------------------------------------------------------------------------

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


def read_jsonl(stream: IO[str], name: str, id_field: str, text_field: str) -> Iterator[SourceRow]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise SourceError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: each line must be a JSON object")
        if id_field not in record:
            raise SourceError(f"{where}: no {id_field!r} field (source.id_field)")
        yield SourceRow(_id_of(record[id_field], where, id_field),
                        _text_of(record.get(text_field), where, text_field))


def read_csv(stream: IO[str], name: str, id_field: str, text_field: str) -> Iterator[SourceRow]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    reader = csv.DictReader(stream, delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise SourceError(f"{name}: bad CSV header ({exc})") from None
    if not header:
        raise SourceError(f"{name}: the file is empty (a header with {id_field!r} and {text_field!r} is needed)")
    for field_name, which in ((id_field, "id_field"), (text_field, "text_field")):
        if field_name not in header:
            # the header itself is file content: never shown back
            raise SourceError(f"{name}: the CSV header has no column named {field_name!r} (source.{which})")
    start = reader.line_num + 1
    try:
        for row in reader:
            where = f"{name}:{start}"
            yield SourceRow(_id_of(row.get(id_field) or None, where, id_field),
                            _text_of(row.get(text_field), where, text_field))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise SourceError(f"{name}:{reader.line_num}: bad CSV ({exc})") from None


def _rows_of(binary: IO[bytes], name: str, kind: str, id_field: str, text_field: str
             ) -> Generator[SourceRow, None, None]:
    try:
        with io.TextIOWrapper(binary, encoding="utf-8-sig" if kind == "csv" else "utf-8", newline="") as stream:
            if kind == "csv":
                yield from read_csv(stream, name, id_field, text_field)
            else:
                yield from read_jsonl(stream, name, id_field, text_field)
    except OSError as exc:
        raise SourceError(f"source file {name}: {exc.strerror or 'cannot be read'}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"source file {name}: not UTF-8 text ({exc.reason})") from None


def read_files(spec: Mapping[str, Any], files: TenantFiles) -> Generator[SourceRow, None, None]:
    """Every row of every file the path or glob matches inside the tenant's directory, in name order."""
    paths = matching_files(files, str(spec["path"]))
    id_field, text_field = str(spec.get("id_field", "id")), str(spec.get("text_field", "text"))
    explicit = str(spec.get("format", "auto"))
    for path in paths:
        kind = file_format(path, explicit)
        yield from _rows_of(open_tenant_file(files, path), path, kind, id_field, text_field)


class _StoredFileReader(io.RawIOBase):
    """An uploaded file's content, one stored part (1 MiB) in memory at a time."""

    def __init__(self, fetch: Callable[[int], bytes | None]) -> None:
        super().__init__()
        self._fetch = fetch
        self._part = 0
        self._buffer = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and not self._done:
            data = self._fetch(self._part)
            self._part += 1
            if data is None:
                self._done = True
            else:
                self._buffer = memoryview(data)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def user_file(session: Session, tenant_id: uuid.UUID, file_id: str) -> StoredFile | None:
    """The tenant's own uploaded data file; another tenant's is as absent as one that never existed."""
    return session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id,
                                                   StoredFile.purpose == USER_DATA))


def read_stored(spec: Mapping[str, Any], session: Session, tenant_id: uuid.UUID
                ) -> Generator[SourceRow, None, None]:
    """The rows of an uploaded file (`source.file_id`), streamed from its stored parts."""
    file_id = str(spec["file_id"])
    stored = user_file(session, tenant_id, file_id)
    if stored is None:
        raise SourceError(f"source.file_id: there is no uploaded file {file_id} (it was deleted?)")
    kind = file_format(stored.filename, str(spec.get("format", "auto")))
    name = file_id + (".tsv" if stored.filename.lower().endswith(".tsv") else "")

    def fetch(part: int) -> bytes | None:
        data: bytes | None = session.scalar(select(FilePart.data).where(FilePart.file_id == file_id,
                                                                        FilePart.part == part))
        return data

    binary = io.BufferedReader(_StoredFileReader(fetch), buffer_size=1 << 16)
    yield from _rows_of(binary, name, kind, str(spec.get("id_field", "id")), str(spec.get("text_field", "text")))


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
