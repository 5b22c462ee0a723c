"""A provider batch's row through its states: the uploaded file, the create attempts and the
provider's batch, its polls, the end (done, or failed and split in halves when the provider refused
it), and the queries the reconciler runs over batches by state.

Each function takes a session and never commits; the worker owns the transactions. Guards on
`status` and `batch_id` make every step safe to run twice.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.states import BatchStatus, ProviderBatchStatus, TaskStatus
from tierbatch.db.models import ProviderBatch, Task
from tierbatch.metrics.batches import count_finished_batch
from tierbatch.metrics.catalog import BATCHES_SUBMITTED
from tierbatch.metrics.commit import after_commit
from tierbatch.providers.adapter import ProviderBatchInfo
from tierbatch.tasks import transitions

TERMINAL_PROVIDER_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
METADATA_KEY = "tierbatch_batch_id"


def record_uploaded_file(session: Session, batch_id: uuid.UUID, file_id: str, lines: int, size: int) -> None:
    session.execute(update(ProviderBatch).where(ProviderBatch.id == batch_id,
                                                ProviderBatch.status == BatchStatus.PREPARING)
                    .values(input_file_id=file_id, request_count=lines, byte_size=size, updated_at=func.now()))


def note_submission_attempt(session: Session, batch_id: uuid.UUID) -> int:
    """Count a create attempt *before* calling the provider, so a retry knows to look first."""
    return int(session.scalar(
        update(ProviderBatch).where(ProviderBatch.id == batch_id)
        .values(attempts=ProviderBatch.attempts + 1, updated_at=func.now())
        .returning(ProviderBatch.attempts)
    ) or 0)


def record_submitted(session: Session, batch_id: uuid.UUID, info: ProviderBatchInfo) -> bool:
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id, ProviderBatch.status == BatchStatus.PREPARING)
        .values(status=BatchStatus.SUBMITTED, provider_batch_id=info.id,
                provider_status=ProviderBatchStatus(info.status), submitted_at=func.now(), updated_at=func.now())
        .returning(ProviderBatch.id, ProviderBatch.provider, ProviderBatch.model)
    ).first()
    if moved is not None:
        after_commit(session, lambda: BATCHES_SUBMITTED.labels(moved.provider, moved.model).inc())
    return moved is not None


def record_poll(session: Session, batch_id: uuid.UUID, info: ProviderBatchInfo) -> bool:
    """Store the provider's status; a terminal one moves the batch to `ingesting` (and is when the provider
    completed it). True if it did."""
    terminal = info.status in TERMINAL_PROVIDER_STATUSES
    values: dict[str, Any] = {"provider_status": ProviderBatchStatus(info.status), "updated_at": func.now()}
    if terminal:
        values.update(status=BatchStatus.INGESTING, completed_at=func.now(), output_file_id=info.output_file_id,
                      error_file_id=info.error_file_id,
                      error=json.dumps(info.errors) if info.errors else None)
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id, ProviderBatch.status == BatchStatus.SUBMITTED)
        .values(**values).returning(ProviderBatch.id)
    ).first()
    return terminal and moved is not None


def tasks_left_in_batch(session: Session, batch_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(Task.id).where(Task.batch_id == batch_id,
                                                      Task.status == TaskStatus.IN_BATCH)))


def finish_batch(session: Session, batch_id: uuid.UUID, status: BatchStatus = BatchStatus.DONE,
                 error: str | None = None) -> bool:
    values: dict[str, Any] = {"status": status, "finished_at": func.now(), "updated_at": func.now()}
    if status is BatchStatus.DONE:
        # ingested only when it was ingesting: a batch emptied before submission is done with nothing to ingest
        values["ingested_at"] = case((ProviderBatch.status == BatchStatus.INGESTING, func.now()), else_=None)
    if error is not None:
        values["error"] = error
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id,
                                    ProviderBatch.status.in_((BatchStatus.INGESTING, BatchStatus.PREPARING)))
        .values(**values).returning(ProviderBatch.provider, ProviderBatch.model, ProviderBatch.submitted_at,
                                    ProviderBatch.finished_at)
    ).first()
    if moved is not None:
        after_commit(session, lambda: count_finished_batch(status, *moved))
    return moved is not None


def touch_batch(session: Session, batch_id: uuid.UUID) -> None:
    session.execute(update(ProviderBatch).where(ProviderBatch.id == batch_id).values(updated_at=func.now()))


# --- whole-batch failures ----------------------------------------------------------------------------


def split_failed_batch(session: Session, config: AppConfig, batch: ProviderBatch, reason: str) -> list[uuid.UUID]:
    """A batch the provider refused as a whole (validation, enqueued-token limit): its tasks go into
    two new batches (halves), submitted after a pause. The claim's attempt covers the whole chain of
    halvings, which ends at a single line; a single line refused on its own fails with the reason."""
    task_ids = sorted(tasks_left_in_batch(session, batch.id))
    new_batches: list[uuid.UUID] = []
    if len(task_ids) == 1:
        transitions.fail_batch_lines(session, batch.id, {task_ids[0]: f"provider refused the batch: {reason}"})
    elif task_ids:
        middle = len(task_ids) // 2
        for half in (task_ids[:middle], task_ids[middle:]):
            new_id = uuid.uuid4()
            session.add(ProviderBatch(
                id=new_id, provider=batch.provider, model=batch.model, status=BatchStatus.PREPARING,
                request_count=len(half), byte_size=0, attempts=0,
                not_before=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, config.batch.failed_batch_retry_seconds),
            ))
            session.flush()
            session.execute(update(Task).where(Task.id.in_(half), Task.batch_id == batch.id,
                                               Task.status == TaskStatus.IN_BATCH)
                            .values(batch_id=new_id, updated_at=func.now()),
                            execution_options={"synchronize_session": False})
            new_batches.append(new_id)
    finish_batch(session, batch.id, BatchStatus.FAILED, error=f"provider refused the batch: {reason}")
    return new_batches


# --- reconciliation ----------------------------------------------------------------------------------


def batches_in(session: Session, status: BatchStatus, *, stale_seconds: float | None = None,
               due_only: bool = False, limit: int = 100) -> list[uuid.UUID]:
    query = select(ProviderBatch.id).where(ProviderBatch.status == status)
    if stale_seconds is not None:
        query = query.where(ProviderBatch.updated_at
                            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, stale_seconds))
    if due_only:
        query = query.where((ProviderBatch.not_before.is_(None)) | (ProviderBatch.not_before <= func.now()))
    return list(session.scalars(query.order_by(ProviderBatch.created_at).limit(limit)))


def created_epoch(batch: ProviderBatch) -> int:
    created: datetime = batch.created_at
    return int(created.timestamp())
