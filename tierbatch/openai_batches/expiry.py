"""Expiry of client batches (OpenAI's 24 h `completion_window`).

A beat step (`due_batches` + `expire_batch`) moves a batch past `expires_at` from `in_progress` to
`finalizing` and cancels its lines not started yet (queued, waiting for a provider batch) in one guarded
statement; lines already at a provider or in flight finish, since their cost is real, and the facade
waits for them (lines that come back to the batch path later are cancelled by the next tick). The batch
then ends `expired` (completed lines in the output file, the cancelled ones as `batch_expired` in the
error file), or `completed` when no line had to be cut off. `expired_at` has no column of its own:
`completed_at` holds it for an expired batch.

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tierbatch.base.states import OPEN_CLIENT_BATCH_STATUSES, TERMINAL_TASK_STATUSES, ClientBatchStatus
from tierbatch.db.models import ClientBatch, Task
from tierbatch.openai_batches.batches import cancel_unstarted
from tierbatch.openai_batches.results import EXPIRING, finalize_batch

EXPIRABLE_STATUSES = OPEN_CLIENT_BATCH_STATUSES


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
