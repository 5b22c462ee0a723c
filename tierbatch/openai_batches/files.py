"""OpenAI's `/v1/files` over our own storage: uploads validated and stored, listed, read, deleted.

- A file (purpose `batch`) is validated line by line when it is uploaded (JSON, unique `custom_id`,
  `POST`, `/v1/chat/completions`, a chat body with `smart-select` or a configured model), within
  OpenAI's limits; its content is kept in Postgres in 1 MiB parts, so every API process serves it.
- A data file (purpose `user_data`) is stored as it comes, for a schedule's source.

Nothing here commits: the caller owns the transaction, so a refused upload leaves nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import and_, insert, or_, select, text
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import InvalidInput, NotFound, TooLarge
from tierbatch.db.models import FilePart, StoredFile
from tierbatch.openai_batches.lines import parse_batch_line

PART_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FileLimits:
    """Batch input limits (OpenAI's: 200 MB, 50,000 requests); settings may lower them."""

    max_bytes: int = 200_000_000
    max_lines: int = 50_000


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def epoch(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def file_object(stored: StoredFile) -> dict[str, Any]:
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": epoch(stored.created_at),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed"}


def no_such_file(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"No such File object: {file_id}", param, None)


class PartWriter:
    """Appends a file's content to `file_parts` in 1 MiB parts."""

    def __init__(self, session: Session, file_id: str) -> None:
        self.session = session
        self.file_id = file_id
        self.buffer = bytearray()
        self.parts = 0
        self.size = 0
        self.lines = 0

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        if len(self.buffer) >= PART_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.session.execute(insert(FilePart), [{"file_id": self.file_id, "part": self.parts,
                                                     "data": bytes(self.buffer)}])
            self.parts += 1
            self.buffer = bytearray()


def store_batch_file(session: Session, tenant_id: uuid.UUID, filename: str, source: IO[bytes],
                     limits: FileLimits, config: AppConfig) -> StoredFile:
    """Validate and store an uploaded batch input file; raises a Refused (store nothing: roll back)."""
    if not filename.endswith(".jsonl"):
        raise InvalidInput("Invalid file format for Batch API. Must be .jsonl", "file", "invalid_file_format")
    stored = StoredFile(id=new_file_id(), tenant_id=tenant_id, purpose="batch", filename=filename, bytes=0,
                        line_count=0)
    session.add(stored)
    session.flush()
    writer = PartWriter(session, stored.id)
    seen: set[str] = set()
    number = 0
    while True:
        raw = source.readline(limits.max_bytes - writer.size + 1)
        if not raw:
            break
        number += 1
        writer.write(raw)
        if writer.size > limits.max_bytes:
            raise TooLarge(f"The file is over the batch input limit of {limits.max_bytes:,} bytes.",
                               "file", "file_too_large")
        if not raw.strip():
            continue
        writer.lines += 1
        if writer.lines > limits.max_lines:
            raise InvalidInput(f"The file has more than {limits.max_lines:,} requests; a batch may have at "
                               f"most {limits.max_lines:,}.", "file", "too_many_requests")
        line = parse_batch_line(number, raw, config)
        if line.custom_id in seen:
            raise InvalidInput(f"Line {number}: the custom_id {line.custom_id!r} is a duplicate of another "
                               "request; custom_id must be unique for each request in a batch.",
                               "custom_id", "duplicate_custom_id")
        seen.add(line.custom_id)
    if writer.lines == 0:
        raise InvalidInput("The file has no requests.", "file", "empty_file")
    writer.flush()
    stored.bytes = writer.size
    stored.line_count = writer.lines
    session.flush()
    return stored


USER_DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
UPLOAD_READ_BYTES = 1 << 20


def store_user_file(session: Session, tenant_id: uuid.UUID, filename: str, source: IO[bytes],
                    limits: FileLimits) -> StoredFile:
    """Store an uploaded data file (purpose `user_data`: CSV or JSONL rows for a schedule's source), read in
    1 MiB pieces into its parts. Not checked line by line: a schedule that reads it reports a bad row."""
    if not filename.lower().endswith(USER_DATA_SUFFIXES):
        raise InvalidInput("Invalid file format for purpose 'user_data'. Must be .csv, .tsv, .jsonl or "
                           ".ndjson", "file", "invalid_file_format")
    stored = StoredFile(id=new_file_id(), tenant_id=tenant_id, purpose="user_data", filename=filename, bytes=0,
                        line_count=0)
    session.add(stored)
    session.flush()
    writer = PartWriter(session, stored.id)
    ended_line = True
    while True:
        data = source.read(min(UPLOAD_READ_BYTES, limits.max_bytes - writer.size + 1))
        if not data:
            break
        writer.write(data)
        if writer.size > limits.max_bytes:
            raise TooLarge(f"The file is over the upload limit of {limits.max_bytes:,} bytes.",
                               "file", "file_too_large")
        writer.lines += data.count(b"\n")
        ended_line = data.endswith(b"\n")
    if writer.size == 0:
        raise InvalidInput("The file is empty.", "file", "empty_file")
    writer.flush()
    stored.bytes = writer.size
    stored.line_count = writer.lines + (0 if ended_line else 1)
    session.flush()
    return stored


def get_file(session: Session, tenant_id: uuid.UUID, file_id: str, param: str = "file_id") -> StoredFile:
    stored = session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id))
    if stored is None:
        raise no_such_file(file_id, param)
    return stored


def list_files(session: Session, tenant_id: uuid.UUID, *, purpose: str | None, limit: int, after: str | None,
               newest_first: bool = True) -> tuple[list[StoredFile], bool]:
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        anchor = get_file(session, tenant_id, after, "after")
        before = or_(StoredFile.created_at < anchor.created_at,
                     and_(StoredFile.created_at == anchor.created_at, StoredFile.id < anchor.id))
        later = or_(StoredFile.created_at > anchor.created_at,
                    and_(StoredFile.created_at == anchor.created_at, StoredFile.id > anchor.id))
        query = query.where(before if newest_first else later)
    order = (StoredFile.created_at.desc(), StoredFile.id.desc()) if newest_first else (
        StoredFile.created_at, StoredFile.id)
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def iter_file_parts(session: Session, file_id: str) -> Iterator[bytes]:
    """The content, part by part (one part in memory at a time)."""
    result = session.execute(select(FilePart.data).where(FilePart.file_id == file_id).order_by(FilePart.part)
                             .execution_options(yield_per=4))
    for (data,) in result:
        yield bytes(data)


def iter_file_lines(session: Session, file_id: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) over the stored content, lines split across parts joined again."""
    carry = b""
    number = 0
    for part in iter_file_parts(session, file_id):
        chunk = carry + part
        lines = chunk.split(b"\n")
        carry = lines.pop()
        for raw in lines:
            number += 1
            yield number, raw
    if carry:
        yield number + 1, carry


def delete_file(session: Session, tenant_id: uuid.UUID, file_id: str) -> dict[str, Any]:
    stored = get_file(session, tenant_id, file_id)
    session.execute(text("DELETE FROM file_parts WHERE file_id = :id"), {"id": stored.id})
    session.delete(stored)
    return {"id": file_id, "object": "file", "deleted": True}
