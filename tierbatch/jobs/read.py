"""Bulk jobs read back: a job, the tenant's jobs page by page, counts and costs per job, results in item order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.base.errors import NotFound
from tierbatch.base.states import TERMINAL_TASK_STATUSES, Mode
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import Job, LedgerEntry, Task


@dataclass(frozen=True, slots=True)
class JobSummary:
    counts: dict[str, int]
    task_count: int
    status: str
    finished_at: datetime | None
    cost_usd: Decimal
    baseline_cost_usd: Decimal
    savings_usd: Decimal
    shadow_cost_usd: Decimal
    unpriced_requests: int


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def list_jobs(session: Session, tenant_id: uuid.UUID, *, limit: int,
              after: tuple[datetime, uuid.UUID] | None) -> list[Job]:
    """Newest first, keyset-paginated on (created_at, id); returns up to limit + 1 rows."""
    return newest_first_page(session, select(Job).where(Job.tenant_id == tenant_id), Job, limit=limit, after=after)


def summarize_jobs(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, JobSummary]:
    """Counts per status and ledger sums for some jobs: one GROUP BY query on each table."""
    if not job_ids:
        return {}
    counts: dict[uuid.UUID, dict[str, int]] = {j: {} for j in job_ids}
    last_finished: dict[uuid.UUID, datetime | None] = dict.fromkeys(job_ids)
    for job_id, status, count, finished in session.execute(
        select(Task.job_id, Task.status, func.count(), func.max(Task.finished_at))
        .where(Task.job_id.in_(job_ids)).group_by(Task.job_id, Task.status)
    ):
        if job_id is None:
            continue
        counts[job_id][status.value] = int(count)
        if finished is not None:
            current = last_finished[job_id]
            last_finished[job_id] = finished if current is None else max(current, finished)
    billed = LedgerEntry.mode != Mode.SHADOW
    zero = Decimal(0)
    money: dict[uuid.UUID, tuple[Decimal, Decimal, Decimal, Decimal, int]] = {}
    for row in session.execute(
        select(LedgerEntry.job_id,
               func.sum(LedgerEntry.cost_usd),  # all spend, shadow calls included (as in GET /v1/costs)
               func.sum(LedgerEntry.baseline_cost_usd).filter(billed),
               func.sum(LedgerEntry.baseline_cost_usd - LedgerEntry.cost_usd).filter(
                   billed, LedgerEntry.cost_usd.is_not(None)),
               func.sum(LedgerEntry.cost_usd).filter(LedgerEntry.mode == Mode.SHADOW),
               func.count().filter(billed, LedgerEntry.unpriced))
        .where(LedgerEntry.job_id.in_(job_ids)).group_by(LedgerEntry.job_id)
    ):
        if row[0] is None:
            continue
        money[row[0]] = (row[1] or zero, row[2] or zero, row[3] or zero, row[4] or zero, int(row[5] or 0))
    out: dict[uuid.UUID, JobSummary] = {}
    terminal = {s.value for s in TERMINAL_TASK_STATUSES}
    for job_id in job_ids:
        by_status = counts[job_id]
        done = all(status in terminal for status in by_status)
        cost, baseline, savings, shadow, unpriced = money.get(job_id, (zero, zero, zero, zero, 0))
        out[job_id] = JobSummary(
            counts=dict(sorted(by_status.items())), task_count=sum(by_status.values()),
            status="completed" if done else "running", finished_at=last_finished[job_id] if done else None,
            cost_usd=cost, baseline_cost_usd=baseline, savings_usd=savings, shadow_cost_usd=shadow,
            unpriced_requests=unpriced)
    return out


def count_tasks(session: Session, job_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).select_from(Task).where(Task.job_id == job_id)) or 0


@dataclass(frozen=True, slots=True)
class ResultRow:
    item_id: str | None
    task_id: uuid.UUID
    status: str
    output: str | None
    model: str | None
    cost_usd: Decimal | None
    error: str | None


def label_of(output: str | None, labels: frozenset[str]) -> str | None:
    """The label of a JSON answer `{"label": ...}`, or None when absent or not one of the labels."""
    if not output:
        return None
    try:
        answer = json.loads(output)
    except ValueError:
        return None
    label = answer.get("label") if isinstance(answer, dict) else None
    return label if isinstance(label, str) and label in labels else None


def iter_results(session: Session, job_id: uuid.UUID, batch_size: int = 2000) -> Iterator[list[ResultRow]]:
    """The job's tasks in submission order, through a server-side cursor (constant memory)."""
    result = session.execute(
        select(Task.item_id, Task.id, Task.status, Task.output, Task.served_model, Task.cost_usd, Task.error)
        .where(Task.job_id == job_id).order_by(Task.id)
        .execution_options(yield_per=batch_size)
    )
    for partition in result.partitions():
        yield [ResultRow(r[0], r[1], r[2].value, r[3], r[4], r[5], r[6]) for r in partition]
