"""The Batch API facade: OpenAI's `/v1/files` and `/v1/batches` over our own task path.

- A file (purpose `batch`) is validated line by line when it is uploaded (JSON, unique `custom_id`,
  `POST`, `/v1/chat/completions`, a chat body with `smart-select` or a configured model), within
  OpenAI's limits; its content is kept in Postgres in 1 MiB parts, so every API process serves it.
- A batch is a job: each line becomes one of its tasks (item id = `custom_id`), routed on its own
  (tier from the line's `metadata.tier`, else auto: the tenant's routing rule for the line's task type,
  then config `[routing]`, then the heuristic; never urgent), all written with one COPY in the
  transaction that creates the batch, then dispatched in chunks. Light lines then take the provider
  batch path; complex lines are called immediately by the worker.
- The batch's status and `request_counts` follow its tasks. When they are all terminal, the first
  read of the batch assembles its output and error files (OpenAI's `BatchRequestOutput` lines, in
  input order, joined by `custom_id`) and freezes the batch, under a row lock, in one transaction.
- Expiry (OpenAI's 24 h `completion_window`): a beat step (`due_batches` + `expire_batch`) moves a batch
  past `expires_at` from `in_progress` to `finalizing` and cancels its lines not started yet (queued,
  waiting for a provider batch) in one guarded statement; lines already at a provider or in flight
  finish, since their cost is real, and the facade waits for them (lines that come back to the batch
  path later are cancelled by the next tick). The batch then ends `expired` (completed lines in the
  output file, the cancelled ones as `batch_expired` in the error file), or `completed` when no line
  had to be cut off. `expired_at` has no column of its own: `completed_at` holds it for an expired batch.

Nothing here commits: the caller owns the transaction, so a refused upload or batch leaves nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, InvalidInput, NotFound, Refused, TooLarge
from tierbatch.base.inputs import NotJson, loads_checked
from tierbatch.base.states import (
    OPEN_CLIENT_BATCH_STATUSES,
    TERMINAL_TASK_STATUSES,
    ClientBatchStatus,
    RequestedTier,
    TaskStatus,
)
from tierbatch.db.models import ClientBatch, FilePart, Job, StoredFile, Task
from tierbatch.gateway.routing import Route, provider_request, route_request
from tierbatch.gateway.validation import validate_chat_body
from tierbatch.jobs.store import copy_task_rows, time_ordered_ids
from tierbatch.providers import openai_validation
from tierbatch.routing.rules import RuleView, tenant_rules
from tierbatch.tasks import transitions

ENDPOINT = "/v1/chat/completions"
OPENAI_BATCH_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                          "/v1/moderations")
COMPLETION_WINDOW = "24h"
PART_BYTES = 1024 * 1024
COPY_CHUNK = 5000
_QUEUED = TaskStatus.QUEUED.value  # a plain str, as the other COPY fields
FINAL_STATUSES = frozenset({ClientBatchStatus.COMPLETED, ClientBatchStatus.FAILED, ClientBatchStatus.EXPIRED,
                            ClientBatchStatus.CANCELLED})
# Stored `finalizing` means: expired, waiting for the lines already at a provider or in flight.
EXPIRING = ClientBatchStatus.FINALIZING
EXPIRABLE_STATUSES = OPEN_CLIENT_BATCH_STATUSES
_HTTP_STATUS = re.compile(r"HTTP (\d{3})")


@dataclass(frozen=True, slots=True)
class FileLimits:
    """Batch input limits (OpenAI's: 200 MB, 50,000 requests); settings may lower them."""

    max_bytes: int = 200_000_000
    max_lines: int = 50_000


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


def epoch(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


# --- files -----------------------------------------------------------------------------------------


def file_object(stored: StoredFile) -> dict[str, Any]:
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": epoch(stored.created_at),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed"}


def no_such_file(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"No such File object: {file_id}", param, None)


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 1-based line number in the file
    custom_id: str
    body: dict[str, Any]
    route: Route


def _line_error(number: int, error: Refused) -> InvalidInput:
    """A line's refusal, as the file's: always a 400 naming the line (a line asking for an unknown model
    too), its param under `body.` when it is one of the request's fields."""
    param = error.param
    in_body = param and not param.startswith(("custom_id", "method", "url", "body"))
    return InvalidInput(f"Line {number}: {error.message}", f"body.{param}" if in_body else param, error.code)


def parse_batch_line(number: int, raw: bytes, config: AppConfig, rules: Mapping[str, RuleView] | None = None
                     ) -> BatchLine:
    """One line of a batch input file, checked as OpenAI checks it plus our routing of its model:
    `smart-select` with tier auto follows the tenant's routing rule for the line's task type (`rules`,
    from `tenant_rules`) before config `[routing]` and the heuristic."""
    try:
        obj = loads_checked(raw)
    except NotJson:
        raise InvalidInput(f"Line {number}: this line is not parseable as valid JSON.",
                           "file", "invalid_json_line") from None
    except InvalidInput as refused:  # nesting too deep, NUL or lone surrogate: never stored
        raise InvalidInput(f"Line {number}: {refused.message}", refused.param or "file", "invalid_value") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"Line {number}: this line is not a JSON object.", "file", "invalid_json_line")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidInput(f"Line {number}: Missing required parameter: 'custom_id'.",
                           "custom_id", "missing_required_parameter")
    if len(custom_id) > 512:
        raise InvalidInput(f"Line {number}: 'custom_id' is longer than 512 characters.",
                           "custom_id", "invalid_value")
    method = obj.get("method")
    if method != "POST":
        raise InvalidInput(f"Line {number}: the method must be 'POST', got {method!r}.",
                           "method", "invalid_method")
    url = obj.get("url")
    if url != ENDPOINT:
        raise InvalidInput(f"Line {number}: the URL {url!r} is not supported; every line must use "
                           f"'{ENDPOINT}'.", "url", "invalid_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InvalidInput(f"Line {number}: Missing required parameter: 'body'.", "body", "missing_required_parameter")
    try:
        validate_chat_body(body, allow_stream=False)
        metadata = body.get("metadata") or {}
        route = route_request(config, body["model"], body["messages"], tier_hint=metadata.get("tier"),
                              task_type_hint=metadata.get("task_type"),
                              tools_requested=bool(body.get("tools") or body.get("functions")), rules=rules)
    except Refused as error:
        raise _line_error(number, error) from None
    return BatchLine(number, custom_id, body, route)


class _PartWriter:
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
    writer = _PartWriter(session, stored.id)
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
    writer = _PartWriter(session, stored.id)
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


# --- creating a batch ----------------------------------------------------------------------------------


def _missing(param: str) -> InvalidInput:
    return InvalidInput(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def check_batch_metadata(metadata: Any) -> dict[str, str] | None:
    try:
        return openai_validation.check_batch_metadata(metadata)
    except openai_validation.InvalidRequest as refused:
        raise InvalidInput(refused.message, refused.param, refused.code) from None


@dataclass(frozen=True, slots=True)
class CreatedBatch:
    batch: ClientBatch
    task_ids: list[str]


def check_create_request(body: Any) -> tuple[str, dict[str, str] | None]:
    """(input_file_id, metadata) of a valid `POST /v1/batches` body."""
    if not isinstance(body, dict):
        raise InvalidInput("Invalid type for request body: expected an object.", None, "invalid_type")
    for key in body:
        if key not in ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"):
            raise InvalidInput(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise _missing("input_file_id")
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise _missing("endpoint")
    if endpoint != ENDPOINT:
        detail = "is not supported by tierbatch" if endpoint in OPENAI_BATCH_ENDPOINTS else "is not a batch endpoint"
        raise InvalidInput(f"Invalid value for 'endpoint': '{endpoint}' {detail}. Supported values are: "
                          f"'{ENDPOINT}'.", "endpoint", "invalid_value")
    window = body.get("completion_window")
    if window is None:
        raise _missing("completion_window")
    if window != COMPLETION_WINDOW:
        raise InvalidInput(f"Invalid value for 'completion_window': '{window}'. Supported values are: '24h'.",
                          "completion_window", "invalid_value")
    return input_file_id, check_batch_metadata(body.get("metadata"))


def _task_rows(lines: Iterator[tuple[int, bytes]], config: AppConfig, tenant_id: uuid.UUID, job_id: uuid.UUID,
               ids: list[uuid.UUID], now: datetime, rules: Mapping[str, RuleView] | None = None
               ) -> Iterator[tuple[Any, ...]]:
    """COPY rows (tierbatch.db.bulk_sql.TASK_COPY_COLUMNS order), one per line: routed on its own, never urgent."""
    tenant, job = str(tenant_id), str(job_id)
    position = 0
    for number, raw in lines:
        if not raw.strip():
            continue
        line = parse_batch_line(number, raw, config, rules)
        body, route = line.body, line.route
        metadata = body.get("metadata") or {}
        request = provider_request(body)
        request.pop("stream", None)
        request.pop("stream_options", None)
        yield (ids[position], line.custom_id, json.dumps(request, ensure_ascii=False), route.tier.value,
               route.reason, tenant, job, route.task_type, route.requested_tier.value, False, None,
               json.dumps(metadata, ensure_ascii=False), _QUEUED, 0, now)
        position += 1


def create_batch(session: Session, tenant_id: uuid.UUID, body: Any, config: AppConfig) -> CreatedBatch:
    """The batch row, its job and one queued task per line, in the caller's transaction."""
    input_file_id, metadata = check_create_request(body)
    stored = get_file(session, tenant_id, input_file_id, "input_file_id")
    if stored.purpose != "batch":
        raise InvalidInput(f"The file {input_file_id} has purpose '{stored.purpose}'; a batch needs a file uploaded "
                          "with purpose 'batch'.", "input_file_id", "invalid_file_purpose")
    now = datetime.now(UTC)
    batch_id = new_batch_id()
    job = Job(id=uuid.uuid4(), tenant_id=tenant_id, name=None, task_type="general",
              requested_tier=RequestedTier.AUTO, urgent=False, deadline=None,
              spec={"openai_batch_id": batch_id, "input_file_id": input_file_id, "metadata": metadata or {}})
    session.add(job)
    session.flush()
    ids = time_ordered_ids(stored.line_count)
    rules = tenant_rules(session, tenant_id)  # the tenant's routing rules: one query per batch, not per line
    rows = _task_rows(iter_file_lines(session, stored.id), config, tenant_id, job.id, ids, now, rules)
    written = 0
    # one COPY per chunk: the file's parts are read through a cursor on the same connection, which
    # cannot fetch while a COPY is open
    while chunk := list(itertools.islice(rows, COPY_CHUNK)):
        written += copy_task_rows(session, iter(chunk))
    batch = ClientBatch(id=batch_id, tenant_id=tenant_id, job_id=job.id, input_file_id=input_file_id,
                        endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW, status=ClientBatchStatus.IN_PROGRESS,
                        batch_metadata=metadata, request_total=written, created_at=now,
                        expires_at=now + timedelta(hours=24), in_progress_at=now)
    session.add(batch)
    session.flush()
    return CreatedBatch(batch, [str(i) for i in ids[:written]])


# --- reading, finishing, cancelling ------------------------------------------------------------------------


def no_such_batch(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", "batch_id", None)


def get_batch(session: Session, tenant_id: uuid.UUID, batch_id: str, *, for_update: bool = False) -> ClientBatch:
    query = select(ClientBatch).where(ClientBatch.id == batch_id, ClientBatch.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None:
        raise no_such_batch(batch_id)
    return batch


def live_counts(session: Session, job_id: uuid.UUID) -> dict[str, int]:
    rows = session.execute(select(Task.status, func.count()).where(Task.job_id == job_id).group_by(Task.status))
    return {status.value: int(count) for status, count in rows}


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int
    live: int  # not yet terminal


def _counts(batch: ClientBatch, by_status: Mapping[str, int]) -> Counts:
    completed = by_status.get(TaskStatus.SUCCEEDED, 0)
    failed = by_status.get(TaskStatus.FAILED, 0)
    live = sum(n for s, n in by_status.items() if s not in TERMINAL_TASK_STATUSES)
    return Counts(batch.request_total, completed, failed, live)


def batch_object(batch: ClientBatch, counts: Counts | None = None, status: str | None = None) -> dict[str, Any]:
    if counts is None:
        counts = Counts(batch.request_total, batch.request_completed or 0, batch.request_failed or 0, 0)
    expired = batch.status == ClientBatchStatus.EXPIRED  # its end time is kept in `completed_at`
    out: dict[str, Any] = {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status or batch.status, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "created_at": epoch(batch.created_at),
        "in_progress_at": epoch(batch.in_progress_at), "expires_at": epoch(batch.expires_at),
        "finalizing_at": epoch(batch.finalizing_at), "completed_at": None if expired else epoch(batch.completed_at),
        "failed_at": None, "expired_at": epoch(batch.completed_at) if expired else None,
        "cancelling_at": epoch(batch.cancelling_at),
        "cancelled_at": epoch(batch.cancelled_at),
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": batch.batch_metadata,
    }
    if batch.usage is not None:
        out["usage"] = batch.usage
    # OpenAI leaves out what is not set yet rather than sending nulls for ids and timestamps
    return {k: v for k, v in out.items() if v is not None or k == "metadata"}


def batch_view(session: Session, batch: ClientBatch) -> dict[str, Any]:
    """The batch as OpenAI shows it: live from its tasks, finalized here once they are all terminal."""
    if batch.status in FINAL_STATUSES:
        return batch_object(batch)
    counts = _counts(batch, live_counts(session, batch.job_id))
    if counts.live == 0:
        if finalize_batch(session, batch.id):
            session.refresh(batch)
            return batch_object(batch)
        return batch_object(batch, counts, ClientBatchStatus.FINALIZING)
    return batch_object(batch, counts)


def _error_line(task_id: uuid.UUID, custom_id: str, status: TaskStatus, error: str | None, *,
                expired: bool = False) -> dict[str, Any]:
    line_id = f"batch_req_{task_id.hex}"
    if expired:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": "batch_expired",
                          "message": "This request could not be executed before the completion window expired."}}
    if status is TaskStatus.CANCELLED:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": "batch_cancelled",
                          "message": "This request was not executed because the batch was cancelled."}}
    message = error or "the request failed"
    match = _HTTP_STATUS.search(message)
    if match is None:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": "request_failed", "message": message}}
    code = int(match.group(1))
    return {"id": line_id, "custom_id": custom_id, "error": None,
            "response": {"status_code": code, "request_id": f"req_{task_id.hex}",
                         "body": {"error": {"message": message,
                                            "type": "server_error" if code >= 500 else "invalid_request_error",
                                            "param": None, "code": None}}}}


def _success_body(response: dict[str, Any] | None, output: str | None, served: str | None,
                  task_id: uuid.UUID) -> dict[str, Any]:
    if response:
        return response
    return {"id": f"chatcmpl-{task_id.hex}", "object": "chat.completion", "created": 0, "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": output},
                         "finish_reason": "stop"}]}


def _new_output_file(session: Session, tenant_id: uuid.UUID, batch_id: str, kind: str) -> _PartWriter:
    stored = StoredFile(id=new_file_id(), tenant_id=tenant_id, purpose="batch_output",
                        filename=f"{batch_id}_{kind}.jsonl", bytes=0, line_count=0)
    session.add(stored)
    session.flush()
    return _PartWriter(session, stored.id)


def finalize_batch(session: Session, batch_id: str) -> bool:
    """Assemble the output and error files and freeze the batch; False if another reader is at it
    (its row is locked) or a task is still live. One transaction: a crash leaves no half batch.

    An expiring batch (stored `finalizing`) ends `expired` when some of its lines were cancelled by the
    expiry (cancelled at or after its `finalizing_at`: `batch_expired` lines), else `completed`."""
    batch = session.scalar(select(ClientBatch).where(ClientBatch.id == batch_id)
                           .with_for_update(skip_locked=True).execution_options(populate_existing=True))
    if batch is None or batch.status in FINAL_STATUSES:
        return False
    counts = _counts(batch, live_counts(session, batch.job_id))
    if counts.live:
        return False
    expiring_since = batch.finalizing_at if batch.status == EXPIRING else None
    finalizing_at = expiring_since or datetime.now(UTC)
    expired_lines = 0
    writers: dict[str, _PartWriter] = {}
    result = session.execute(
        select(Task.id, Task.item_id, Task.status, Task.response, Task.output, Task.served_model, Task.error,
               Task.finished_at)
        .where(Task.job_id == batch.job_id).order_by(Task.id).execution_options(yield_per=2000))
    for task_id, custom_id, status, response, output, served, error, finished_at in result:
        if status is TaskStatus.SUCCEEDED:
            kind = "output"
            line: dict[str, Any] = {
                "id": f"batch_req_{task_id.hex}", "custom_id": custom_id, "error": None,
                "response": {"status_code": 200, "request_id": f"req_{task_id.hex}",
                             "body": _success_body(response, output, served, task_id)}}
        else:
            kind = "error"
            # cancelled by the expiry: the tick's statement ran at (or after) the batch's finalizing_at
            cut_off = (expiring_since is not None and status is TaskStatus.CANCELLED and finished_at is not None
                       and finished_at >= expiring_since)
            expired_lines += cut_off
            line = _error_line(task_id, custom_id or "", status, error, expired=cut_off)
        writer = writers.get(kind)
        if writer is None:
            writer = writers[kind] = _new_output_file(session, batch.tenant_id, batch.id, kind)
        writer.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        writer.lines += 1
    for writer in writers.values():
        writer.flush()
        session.execute(update(StoredFile).where(StoredFile.id == writer.file_id)
                        .values(bytes=writer.size, line_count=writer.lines))
    usage = session.execute(text(
        "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(cached_tokens), 0), coalesce(sum(output_tokens), 0), "
        "coalesce(sum(reasoning_tokens), 0) FROM tasks WHERE job_id = :job AND status = 'succeeded'"),
        {"job": batch.job_id}).one()
    now = datetime.now(UTC)
    cancelled = batch.status == ClientBatchStatus.CANCELLING
    batch.status = (ClientBatchStatus.CANCELLED if cancelled else ClientBatchStatus.EXPIRED if expired_lines
                    else ClientBatchStatus.COMPLETED)
    batch.finalizing_at = finalizing_at
    if cancelled:
        batch.cancelled_at = now
    else:
        batch.completed_at = now  # for an expired batch: its expired_at
    batch.request_completed = counts.completed
    batch.request_failed = counts.failed
    batch.output_file_id = writers["output"].file_id if "output" in writers else None
    batch.error_file_id = writers["error"].file_id if "error" in writers else None
    batch.usage = {"input_tokens": int(usage[0]), "input_tokens_details": {"cached_tokens": int(usage[1])},
                   "output_tokens": int(usage[2]), "output_tokens_details": {"reasoning_tokens": int(usage[3])},
                   "total_tokens": int(usage[0]) + int(usage[2])}
    session.flush()
    return True


def list_batches(session: Session, tenant_id: uuid.UUID, *, limit: int, after: str | None
                 ) -> tuple[list[ClientBatch], bool]:
    """Newest first, keyset on (created_at, id); `after` is the id of the last batch of the previous page."""
    query = select(ClientBatch).where(ClientBatch.tenant_id == tenant_id)
    if after is not None:
        anchor = session.scalar(select(ClientBatch).where(ClientBatch.id == after,
                                                          ClientBatch.tenant_id == tenant_id))
        if anchor is None:
            raise InvalidInput(f"Invalid 'after': no batch with id '{after}'.", "after", "invalid_value")
        query = query.where(or_(ClientBatch.created_at < anchor.created_at,
                                and_(ClientBatch.created_at == anchor.created_at, ClientBatch.id < anchor.id)))
    rows = list(session.scalars(query.order_by(ClientBatch.created_at.desc(), ClientBatch.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_batch(session: Session, tenant_id: uuid.UUID, batch_id: str) -> ClientBatch:
    """in_progress → cancelling: the lines not started yet (queued, waiting for a provider batch) are
    cancelled; the ones at a provider or in flight finish, and the batch ends `cancelled` with them."""
    batch = get_batch(session, tenant_id, batch_id, for_update=True)
    if batch.status in FINAL_STATUSES or batch.status == EXPIRING:  # an expiring batch ends `expired`
        raise Conflict(f"Cannot cancel a batch with status '{batch.status}'.", None, None)
    if batch.status != ClientBatchStatus.CANCELLING:
        batch.status = ClientBatchStatus.CANCELLING
        batch.cancelling_at = datetime.now(UTC)
        cancel_unstarted(session, batch.job_id)
        session.flush()
    return batch


def cancel_unstarted(session: Session, job_id: uuid.UUID) -> int:
    """Cancel the tasks of a batch not started yet (queued, waiting for a provider batch): one guarded
    statement. Tasks at a provider or in flight are left to finish; a provider line that lands later
    for a cancelled task is ignored by ingestion (it only moves tasks still `in_batch`)."""
    return transitions.cancel_unstarted_of_job(session, job_id)


# --- expiry -------------------------------------------------------------------------------------------


def due_batches(session: Session, limit: int = 1000) -> list[str]:
    """The batches past `expires_at` and not final: `in_progress` ones, and expiring ones (`finalizing`)
    still waiting for lines in flight. The partial index `ix_client_batches_due` (revision 0005) holds only
    the open batches, so this reads the due ones, not every batch ever created."""
    return list(session.scalars(
        select(ClientBatch.id).where(ClientBatch.status.in_(EXPIRABLE_STATUSES), ClientBatch.expires_at <= func.now())
        .order_by(ClientBatch.expires_at).limit(limit)))


def expire_batch(session: Session, batch_id: str) -> str | None:
    """One step of a batch past its window, under its row lock (`SKIP LOCKED`: a batch another worker or
    reader holds is left to it); the batch's status after the step, None if there was nothing to do.

    - `in_progress` with every line done: finalized as usual (`completed`): it finished in time.
    - `in_progress` with live lines: guarded `in_progress → finalizing` (finalizing_at = now).
    - then, as on every later step of a `finalizing` batch: its lines not started yet are cancelled
      (also the ones that came back from a provider batch since), and the batch is finalized
      (`expired`) once its lines in flight are done."""
    row = session.execute(
        select(ClientBatch.status, ClientBatch.job_id)
        .where(ClientBatch.id == batch_id, ClientBatch.status.in_(EXPIRABLE_STATUSES),
               ClientBatch.expires_at <= func.now())
        .with_for_update(skip_locked=True)).first()
    if row is None:
        return None
    status, job_id = row
    if status == ClientBatchStatus.IN_PROGRESS:
        live = session.scalar(select(Task.id).where(Task.job_id == job_id,
                                                    Task.status.notin_(TERMINAL_TASK_STATUSES)).limit(1))
        if live is not None:
            moved = session.execute(
                update(ClientBatch)
                .where(ClientBatch.id == batch_id, ClientBatch.status == ClientBatchStatus.IN_PROGRESS)
                .values(status=EXPIRING, finalizing_at=func.now()).returning(ClientBatch.id)
                .execution_options(synchronize_session=False)).first()
            if moved is None:
                return None
    cancel_unstarted(session, job_id)
    session.flush()
    finalize_batch(session, batch_id)
    return session.scalar(select(ClientBatch.status).where(ClientBatch.id == batch_id)
                          .execution_options(populate_existing=True))
