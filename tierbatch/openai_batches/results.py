"""A client batch finished: its output and error files assembled, its status and counts frozen.

When every task of a batch is terminal, the first read of the batch assembles its output and error files
(OpenAI's `BatchRequestOutput` lines, in input order, joined by `custom_id`) and freezes the batch, under a
row lock, in one transaction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from tierbatch.base.states import TERMINAL_TASK_STATUSES, ClientBatchStatus, TaskStatus
from tierbatch.db.models import ClientBatch, StoredFile, Task
from tierbatch.openai_batches.files import PartWriter, new_file_id

FINAL_STATUSES = frozenset({ClientBatchStatus.COMPLETED, ClientBatchStatus.FAILED, ClientBatchStatus.EXPIRED,
                            ClientBatchStatus.CANCELLED})
# Stored `finalizing` means: expired, waiting for the lines already at a provider or in flight.
EXPIRING = ClientBatchStatus.FINALIZING
_HTTP_STATUS = re.compile(r"HTTP (\d{3})")


def live_counts(session: Session, job_id: uuid.UUID) -> dict[str, int]:
    rows = session.execute(select(Task.status, func.count()).where(Task.job_id == job_id).group_by(Task.status))
    return {status.value: int(count) for status, count in rows}


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int
    live: int  # not yet terminal


def counts_of(batch: ClientBatch, by_status: Mapping[str, int]) -> Counts:
    completed = by_status.get(TaskStatus.SUCCEEDED, 0)
    failed = by_status.get(TaskStatus.FAILED, 0)
    live = sum(n for s, n in by_status.items() if s not in TERMINAL_TASK_STATUSES)
    return Counts(batch.request_total, completed, failed, live)


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


def _new_output_file(session: Session, tenant_id: uuid.UUID, batch_id: str, kind: str) -> PartWriter:
    stored = StoredFile(id=new_file_id(), tenant_id=tenant_id, purpose="batch_output",
                        filename=f"{batch_id}_{kind}.jsonl", bytes=0, line_count=0)
    session.add(stored)
    session.flush()
    return PartWriter(session, stored.id)


def finalize_batch(session: Session, batch_id: str) -> bool:
    """Assemble the output and error files and freeze the batch; False if another reader is at it
    (its row is locked) or a task is still live. One transaction: a crash leaves no half batch.

    An expiring batch (stored `finalizing`) ends `expired` when some of its lines were cancelled by the
    expiry (cancelled at or after its `finalizing_at`: `batch_expired` lines), else `completed`."""
    batch = session.scalar(select(ClientBatch).where(ClientBatch.id == batch_id)
                           .with_for_update(skip_locked=True).execution_options(populate_existing=True))
    if batch is None or batch.status in FINAL_STATUSES:
        return False
    counts = counts_of(batch, live_counts(session, batch.job_id))
    if counts.live:
        return False
    expiring_since = batch.finalizing_at if batch.status == EXPIRING else None
    finalizing_at = expiring_since or datetime.now(UTC)
    expired_lines = 0
    writers: dict[str, PartWriter] = {}
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
