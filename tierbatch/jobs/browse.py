"""Jobs and tasks read for the dashboard: one tenant's, or every tenant's for the operator.

`scope` is a tenant id, or None for the operator (the admin token), who sees every tenant. A tenant's
scope never finds another tenant's rows: the id is part of every query, and an id of another tenant is
NotFound, as on the API.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierbatch.base.errors import NotFound
from tierbatch.base.states import Mode
from tierbatch.db.models import Job, LedgerEntry, Task

Scope = uuid.UUID | None  # None: every tenant (the operator)


def list_jobs_in(session: Session, scope: Scope, *, limit: int) -> list[Job]:
    """Newest first."""
    query = select(Job)
    if scope is not None:
        query = query.where(Job.tenant_id == scope)
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def find_job(session: Session, scope: Scope, job_id: uuid.UUID) -> Job:
    query = select(Job).where(Job.id == job_id)
    if scope is not None:
        query = query.where(Job.tenant_id == scope)
    job = session.scalar(query)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def job_tasks(session: Session, job_id: uuid.UUID, *, limit: int) -> list[Task]:
    """The job's tasks in submission order (the monitor's shadow tasks left out)."""
    return list(session.scalars(select(Task).where(Task.job_id == job_id, Task.shadow_of.is_(None))
                                .order_by(Task.id).limit(limit)))


def find_task(session: Session, scope: Scope, task_id: uuid.UUID) -> Task:
    query = select(Task).where(Task.id == task_id, Task.shadow_of.is_(None))
    if scope is not None:
        query = query.where(Task.tenant_id == scope)
    task = session.scalar(query)
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def recent_tasks(session: Session, scope: Scope, *, limit: int) -> list[Task]:
    """Newest first, tasks of jobs and single tasks alike."""
    query = select(Task).where(Task.shadow_of.is_(None))
    if scope is not None:
        query = query.where(Task.tenant_id == scope)
    return list(session.scalars(query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit)))


def task_ledger(session: Session, task: Task) -> list[LedgerEntry]:
    """The ledger rows of a task: its served answer and the quality monitor's shadow calls on its behalf
    (written under the task's id, or under a shadow task's on the batch path). Each query goes through an
    index: the billed row's unique index, then the job's rows (or the tenant's since the task was made)."""
    rows = list(session.scalars(select(LedgerEntry).where(LedgerEntry.task_id == task.id,
                                                          LedgerEntry.mode != Mode.SHADOW)))
    shadows = select(LedgerEntry).where(LedgerEntry.task_id == task.id, LedgerEntry.mode == Mode.SHADOW)
    if task.job_id is not None:
        shadows = shadows.where(LedgerEntry.job_id == task.job_id)
    else:
        shadows = shadows.where(LedgerEntry.tenant_id == task.tenant_id, LedgerEntry.created_at >= task.created_at)
    rows.extend(session.scalars(shadows))
    shadow_task = session.scalar(select(Task).where(Task.shadow_of == task.id))
    if shadow_task is not None:
        rows.extend(session.scalars(select(LedgerEntry).where(
            LedgerEntry.tenant_id == task.tenant_id, LedgerEntry.task_id == shadow_task.id,
            LedgerEntry.created_at >= shadow_task.created_at)))
    return sorted(rows, key=lambda row: (row.created_at, row.id))
