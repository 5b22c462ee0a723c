"""File sources: a path or a glob inside the tenant's directory, or a file it uploaded, read as a stream.

A path or a glob is relative to the tenant's own directory `<[files] root>/<tenant id>/` (every match,
in name order; tierbatch/schedules/tenant_files.py opens them without following links); a file the tenant
uploaded is `POST /v1/files`, purpose `user_data`. JSONL or CSV (by extension, or `format`), with
configurable id and text fields. Read row by row; memory does not grow with the file.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierbatch.db.models import FilePart, StoredFile
from tierbatch.schedules.source_rows import SourceError, SourceRow, item_id_of, item_text_of
from tierbatch.schedules.tenant_files import TenantFiles, matching_files, open_tenant_file

CSV_FIELD_LIMIT = 16 * 1024 * 1024
USER_DATA = "user_data"
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES = (".csv", ".tsv")


def file_format(name: str, explicit: str) -> str:
    if explicit != "auto":
        return explicit
    suffix = Path(name).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    raise SourceError(f"{name}: cannot tell the format from the extension {suffix!r}; set source.format")


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
        yield SourceRow(item_id_of(record[id_field], where, id_field),
                        item_text_of(record.get(text_field), where, text_field))


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
            yield SourceRow(item_id_of(row.get(id_field) or None, where, id_field),
                            item_text_of(row.get(text_field), where, text_field))
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
