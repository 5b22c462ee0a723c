"""Reading provider batches for people: one batch or a page of them, newest first, each with the counts
of its lines by outcome, as one tenant sees them (only batches holding its tasks, counting only its
lines) or as the operator sees them (every batch, every line).

A line belongs to a batch while its task's `batch_id` names it (`ix_tasks_batch`). A task keeps it once
served by the batch, failed in it, or taken out of it for an immediate call to meet its deadline; it
loses it when its line is returned to wait for another batch (a line error, or a line missing from an
expired batch's output) and changes it when a batch the provider refused is split in halves. So the
counts say where the lines still attributed to the batch are now; the lines that left it are
`retried`, known only against the number of lines the batch was sent with, hence only to the operator
(a tenant's share of them is recorded nowhere).

Functions take a session and never commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from tierbatch.base.errors import InvalidInput, NotFound
from tierbatch.base.states import BatchStatus, Mode, ProviderBatchStatus, TaskStatus
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import ProviderBatch, Task

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class LineCounts:
    """Lines of one batch by outcome.

    - ``succeeded`` / ``failed``: answered or failed by the batch (a line failed after its last allowed
      batch stays with the batch that failed it);
    - ``pending``: still in the batch, waiting for the provider's output or for its ingestion;
    - ``escalated``: taken out of the batch and sent as an immediate call, because the batch could no
      longer meet its deadline (whatever that call's outcome);
    - ``retried``: lines the batch was sent with that left it for another batch; None when unknown
      (a tenant's view).
    """

    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    escalated: int = 0
    retried: int | None = None

    @property
    def attributed(self) -> int:
        """The lines still attributed to the batch."""
        return self.succeeded + self.failed + self.pending + self.escalated


@dataclass(frozen=True, slots=True)
class ProviderBatchView:
    id: uuid.UUID
    provider: str
    model: str
    provider_batch_id: str | None
    status: BatchStatus
    provider_status: ProviderBatchStatus | None
    request_count: int
    line_counts: LineCounts
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    ingested_at: datetime | None
    error: str | None

    @property
    def turnaround_seconds(self) -> float | None:
        """How long the provider took: from our submission to the poll that found it finished."""
        if self.submitted_at is None or self.completed_at is None:
            return None
        return (self.completed_at - self.submitted_at).total_seconds()


@dataclass(frozen=True, slots=True)
class LineGroup:
    """One row of the grouped count: how many of a batch's lines are in (status, mode)."""

    status: TaskStatus
    mode: Mode | None
    count: int


def count_lines(groups: Iterable[LineGroup], sent: int | None) -> LineCounts:
    """Shape grouped task counts into line outcomes; `sent` is the number of lines the batch was sent
    with when the viewer may know it (the operator), so the lines that left it can be told."""
    succeeded = failed = pending = escalated = 0
    for group in groups:
        if group.mode is not Mode.BATCH:
            escalated += group.count  # claimed for an immediate call (mode immediate, or cache on the way)
        elif group.status is TaskStatus.SUCCEEDED:
            succeeded += group.count
        elif group.status is TaskStatus.FAILED:
            failed += group.count
        elif group.status is TaskStatus.IN_BATCH:
            pending += group.count
        else:
            # a batch-mode task out of the batch states yet still naming it: not reachable through the
            # transitions today; counted with the lines that left the batch path rather than dropped
            escalated += group.count
    attributed = succeeded + failed + pending + escalated
    retried = None if sent is None else max(0, sent - attributed)
    return LineCounts(succeeded, failed, pending, escalated, retried)


def parse_cursor(value: str) -> uuid.UUID:
    """The `after` cursor of a page: the id of the last batch of the previous one."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"after: {value[:64]!r} is not a cursor this listing returned", param="after") from None


def _visible(query: Select[Any], tenant_id: uuid.UUID | None) -> Select[Any]:
    """Only the batches holding at least one of the tenant's tasks (every batch for the operator)."""
    if tenant_id is None:
        return query
    return query.where(exists().where(Task.batch_id == ProviderBatch.id, Task.tenant_id == tenant_id))


def _line_groups(session: Session, batch_ids: Sequence[uuid.UUID], tenant_id: uuid.UUID | None
                 ) -> dict[uuid.UUID, list[LineGroup]]:
    """One grouped query over the page's batches (`ix_tasks_batch`)."""
    grouped: dict[uuid.UUID, list[LineGroup]] = {batch_id: [] for batch_id in batch_ids}
    if not batch_ids:
        return grouped
    query = (select(Task.batch_id, Task.status, Task.mode, func.count())
             .where(Task.batch_id.in_(batch_ids)).group_by(Task.batch_id, Task.status, Task.mode))
    if tenant_id is not None:
        query = query.where(Task.tenant_id == tenant_id)
    for batch_id, status, mode, count in session.execute(query).tuples():
        if batch_id is not None:  # always: the filter names it
            grouped[batch_id].append(LineGroup(status, mode, int(count)))
    return grouped


def _views(session: Session, batches: Sequence[ProviderBatch], tenant_id: uuid.UUID | None
           ) -> list[ProviderBatchView]:
    groups = _line_groups(session, [batch.id for batch in batches], tenant_id)
    views = []
    for batch in batches:
        counts = count_lines(groups[batch.id], None if tenant_id is not None else batch.request_count)
        views.append(ProviderBatchView(
            id=batch.id, provider=batch.provider, model=batch.model, provider_batch_id=batch.provider_batch_id,
            status=batch.status, provider_status=batch.provider_status,
            # a tenant is told about its own lines only: the batch's size would tell of other tenants
            request_count=counts.attributed if tenant_id is not None else batch.request_count,
            line_counts=counts, created_at=batch.created_at, submitted_at=batch.submitted_at,
            completed_at=batch.completed_at, ingested_at=batch.ingested_at, error=batch.error,
        ))
    return views


def get_provider_batch(session: Session, batch_id: uuid.UUID, *, tenant_id: uuid.UUID | None) -> ProviderBatchView:
    """One batch as `tenant_id` sees it (None: the operator). NotFound when it does not exist or holds
    none of the tenant's tasks."""
    batch = session.scalars(_visible(select(ProviderBatch).where(ProviderBatch.id == batch_id), tenant_id)).first()
    if batch is None:
        raise NotFound(f"no provider batch {batch_id}", param="id")
    return _views(session, [batch], tenant_id)[0]


def list_provider_batches(
    session: Session, *, tenant_id: uuid.UUID | None, status: BatchStatus | None = None,
    provider: str | None = None, model: str | None = None, limit: int = 100, after: uuid.UUID | None = None,
) -> tuple[list[ProviderBatchView], uuid.UUID | None]:
    """A page of batches, newest first, as `tenant_id` sees them (None: the operator), and the cursor of
    the next page (None on the last). `after` is a cursor this function returned: the id of a batch the
    same viewer can see (else InvalidInput naming `after`)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit: must be between 1 and {MAX_PAGE}", param="limit")
    query = _visible(select(ProviderBatch), tenant_id)
    if status is not None:
        query = query.where(ProviderBatch.status == status)
    if provider is not None:
        query = query.where(ProviderBatch.provider == provider)
    if model is not None:
        query = query.where(ProviderBatch.model == model)
    anchor = None
    if after is not None:
        anchor = session.scalars(_visible(select(ProviderBatch).where(ProviderBatch.id == after), tenant_id)).first()
        if anchor is None:
            raise InvalidInput(f"after: no provider batch {after} in this listing", param="after")
    rows: list[ProviderBatch] = newest_first_page(
        session, query, ProviderBatch, limit=limit,
        after=None if anchor is None else (anchor.created_at, anchor.id))
    page, more = rows[:limit], len(rows) > limit
    return _views(session, page, tenant_id), (page[-1].id if more else None)

