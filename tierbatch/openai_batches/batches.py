"""The Batch API facade: OpenAI's `/v1/batches` over our own task path.

- A batch is a job: each line becomes one of its tasks (item id = `custom_id`), routed on its own
  (tier from the line's `metadata.tier`, else auto: the tenant's routing rule for the line's task type,
  then config `[routing]`, then the heuristic; never urgent), all written with one COPY in the
  transaction that creates the batch, then dispatched in chunks. Light lines then take the provider
  batch path; complex lines are called immediately by the worker.
- The batch's status and `request_counts` follow its tasks. When they are all terminal, the first
  read of the batch assembles its output and error files and freezes it
  (tierbatch/openai_batches/results.py).
- Cancelling moves the batch to `cancelling` and cancels its lines not started yet; it ends `cancelled`
  when the lines already at a provider or in flight are done.

Nothing here commits: the caller owns the transaction, so a refused batch leaves nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, InvalidInput, NotFound
from tierbatch.base.ids import new_task_ids
from tierbatch.base.states import ClientBatchStatus, RequestedTier, TaskStatus
from tierbatch.db.models import ClientBatch, Job
from tierbatch.gateway.routing import provider_request
from tierbatch.jobs.store import copy_task_rows
from tierbatch.openai_batches.files import epoch, get_file, iter_file_lines
from tierbatch.openai_batches.lines import ENDPOINT, parse_batch_line
from tierbatch.openai_batches.results import EXPIRING, FINAL_STATUSES, Counts, counts_of, finalize_batch, live_counts
from tierbatch.providers import openai_validation
from tierbatch.routing.rules import RuleView, tenant_rules
from tierbatch.tasks import transitions

OPENAI_BATCH_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                          "/v1/moderations")
COMPLETION_WINDOW = "24h"
COPY_CHUNK = 5000
_QUEUED = TaskStatus.QUEUED.value  # a plain str, as the other COPY fields


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


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
               json.dumps(metadata, ensure_ascii=False), _QUEUED, 0, now, None, None, None)
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
    ids = new_task_ids(stored.line_count)
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
    counts = counts_of(batch, live_counts(session, batch.job_id))
    if counts.live == 0:
        if finalize_batch(session, batch.id):
            session.refresh(batch)
            return batch_object(batch)
        return batch_object(batch, counts, ClientBatchStatus.FINALIZING)
    return batch_object(batch, counts)


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
