"""Bulk jobs stored: create a job (or find it by name), COPY its tasks, append items, cancel it.

Naming: a request with the `name` of an existing job of the tenant *adds* its items to that job
(item ids stay unique within the job); without a `name`, every request makes a new job. Requests
for one (tenant, name) are serialized by a transaction-scoped advisory lock.

`webhook_url` (optional): once every task of the job is terminal, a signed `job.finished` POST goes
there (tierbatch/jobs/webhooks.py). It is set by the request that creates the job; a request that appends
by name may repeat the same URL or leave it out, a different one is a 409 (like the other settings).

Nothing here commits and nothing sends messages: the caller commits, then dispatches the returned
task ids in chunks (`dispatch_in_chunks`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Text, any_, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, NotFound
from tierbatch.base.ids import Clock, new_task_ids
from tierbatch.base.messaging import DISPATCH_CHUNK, DISPATCH_TASKS
from tierbatch.base.states import TaskStatus
from tierbatch.costs.budgets import check_budget
from tierbatch.db.bulk_sql import COPY_JOB_ITEM_IDS, COPY_TASKS, TASK_COPY_COLUMNS
from tierbatch.db.models import Job, JobItemId, Task
from tierbatch.jobs.read import count_tasks, get_job
from tierbatch.jobs.requests import JobItem, JobRequest, JobSettings, check_items
from tierbatch.jobs.rows import task_rows
from tierbatch.routing.rules import RuleView, tenant_rules
from tierbatch.tasks import transitions

_SETTING_KEYS = ("task_type", "tier", "urgent", "deadline", "params", "system", "template", "labels",
                 "metadata")


@dataclass(frozen=True, slots=True)
class JobSubmission:
    job: Job
    created: bool
    task_ids: list[str]
    task_count: int  # tasks of the job after this request
    queued_ids: list[str]  # the tasks left `queued`, to dispatch; the others went straight to `waiting_batch`

    def counts(self) -> dict[str, int]:
        return status_counts(len(self.queued_ids), len(self.task_ids) - len(self.queued_ids))


def status_counts(queued: int, waiting_batch: int) -> dict[str, int]:
    """The statuses the items of one request were stored in, as the API's `counts` shows them."""
    counts = {TaskStatus.QUEUED.value: queued, TaskStatus.WAITING_BATCH.value: waiting_batch}
    return {status: count for status, count in counts.items() if count}


def _lock_name(session: Session, tenant_id: uuid.UUID, name: str) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                    {"key": f"tierbatch.job:{tenant_id}:{name}"})


def _settings_for_append(job: Job, request: JobRequest) -> JobSettings:
    stored = JobSettings.of_job(job)
    for key in _SETTING_KEYS:
        if key in request.given and request.settings.value_of(key) != stored.value_of(key):
            raise Conflict(
                f"{key}: job {job.name!r} already exists with a different {key} ({stored.value_of(key)!r}); "
                "a request that adds items to it must repeat the same value or leave it out",
                param=key)
    if request.webhook_url is not None and request.webhook_url != job.webhook_url:
        raise Conflict(
            f"webhook_url: job {job.name!r} already exists with "
            f"{'webhook_url ' + repr(job.webhook_url) if job.webhook_url else 'no webhook_url'}; a request that adds "
            "items to it must repeat the same value or leave it out", param="webhook_url")
    return stored


def _job_for_request(session: Session, tenant_id: uuid.UUID, request: JobRequest) -> tuple[Job, bool]:
    if request.name is not None:
        _lock_name(session, tenant_id, request.name)
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.name == request.name)
            .order_by(Job.created_at.desc(), Job.id.desc()).limit(1)
            # NO KEY UPDATE: ledger rows and tasks referencing the job (FOR KEY SHARE) are not blocked
            .with_for_update(key_share=True)
        )
        if existing is not None:
            return existing, False
    settings = request.settings
    job = Job(id=uuid.uuid4(), tenant_id=tenant_id, name=request.name, task_type=settings.task_type,
              requested_tier=settings.tier, urgent=settings.urgent, deadline=settings.deadline,
              spec=settings.spec(), webhook_url=request.webhook_url)
    session.add(job)
    session.flush()
    return job, True


def _first_existing_item(session: Session, job_id: uuid.UUID, item_ids: list[str]) -> str | None:
    return session.scalar(
        select(JobItemId.item_id).where(JobItemId.job_id == job_id,
                                        JobItemId.item_id == any_(bindparam("ids", item_ids, type_=ARRAY(Text))))
        .limit(1))


_ITEM = TASK_COPY_COLUMNS.index("item_id")
_JOB = TASK_COPY_COLUMNS.index("job_id")


def copy_task_rows(session: Session, rows: Iterator[tuple[Any, ...]]) -> int:
    """Write rows with one text-format COPY on the session's own connection (same transaction), then their
    job item ids with another into `job_item_ids`, whose primary key refuses an item id the job has taken."""
    raw = session.connection().connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    written = 0
    items: list[tuple[Any, Any]] = []
    with raw.cursor() as cursor:
        with cursor.copy(COPY_TASKS) as copy:
            for row in rows:
                copy.write_row(row)
                written += 1
                if row[_ITEM] is not None:
                    items.append((row[_JOB], row[_ITEM]))
        if items:
            with cursor.copy(COPY_JOB_ITEM_IDS) as copy:
                for item in items:
                    copy.write_row(item)
    return written


def _check_not_in_job(session: Session, job: Job, items: Sequence[JobItem], offset: int = 0) -> None:
    item_ids = [item.id for item in items]
    clash = _first_existing_item(session, job.id, item_ids)
    if clash is not None:
        where = f"items[{item_ids.index(clash) + offset}].id"
        raise Conflict(f"{where}: job {job.name or job.id!s} already has an item with id {clash!r}",
                           param=where)


_STATUS_AT = TASK_COPY_COLUMNS.index("status")
_QUEUED = TaskStatus.QUEUED.value


def _copy_items(session: Session, job: Job, settings: JobSettings, items: Sequence[JobItem],
                config: AppConfig, rules: Mapping[str, RuleView],
                clock: Clock = time.time) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """COPY the items' tasks; returns every new task id and the ids of those left `queued`."""
    budget_reason = check_budget(session, job.tenant_id, config)  # 402 under `reject`
    ids = new_task_ids(len(items), clock)
    queued: list[uuid.UUID] = []

    def noting_queued(rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for row in rows:
            if row[_STATUS_AT] == _QUEUED:
                queued.append(row[0])
            yield row

    rows = task_rows(items, ids, settings, config, job.tenant_id, job.id, datetime.now(UTC), budget_reason,
                     rules)
    try:
        copy_task_rows(session, noting_queued(rows))
    except psycopg.errors.UniqueViolation as exc:  # job_item_ids backs up the check before; the caller rolls back
        raise Conflict(f"items: an item id is already in job {job.name or job.id!s} "
                           f"({exc.diag.message_detail})", param="items") from None
    return ids, queued


def submit_job(session: Session, tenant_id: uuid.UUID, request: JobRequest, config: AppConfig,
               clock: Clock = time.time) -> JobSubmission:
    """Create the job (or find the tenant's job of that name) and COPY its tasks as `queued`; `clock`
    makes the task ids (tierbatch.base.ids)."""
    job, created = _job_for_request(session, tenant_id, request)
    settings = request.settings if created else _settings_for_append(job, request)
    before = 0
    if not created:
        _check_not_in_job(session, job, request.items)
        before = count_tasks(session, job.id)
    rules = tenant_rules(session, tenant_id)  # the tenant's routing rules: one query per request
    ids, queued = _copy_items(session, job, settings, request.items, config, rules, clock)
    return JobSubmission(job, created, [str(i) for i in ids], before + len(ids), [str(i) for i in queued])


class ItemAppender:
    """Adds items to a job chunk by chunk inside the caller's transaction (NDJSON upload).

    Each chunk is checked (also against the items already in the job, including earlier chunks of
    this upload: same transaction) and COPied; only the id range and two counts are kept, so memory
    stays flat whatever the size of the upload.
    """

    def __init__(self, session: Session, job: Job, settings: JobSettings, config: AppConfig,
                 max_item_bytes: int, created: bool = False) -> None:
        self.session, self.job, self.settings, self.config = session, job, settings, config
        self.max_item_bytes = max_item_bytes
        self.created = created
        self.rules = tenant_rules(session, job.tenant_id)  # once per upload, not per chunk
        self.added = 0
        self.queued = 0  # of `added`, left for routing; the others went straight to `waiting_batch`
        self.first_id: uuid.UUID | None = None
        self.last_id: uuid.UUID | None = None

    @classmethod
    def for_job(cls, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, config: AppConfig,
                max_item_bytes: int) -> ItemAppender:
        """Items added to an existing job (`POST /v1/jobs/{id}/items`)."""
        job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
                             .with_for_update(key_share=True))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return cls(session, job, JobSettings.of_job(job), config, max_item_bytes)

    @classmethod
    def for_request(cls, session: Session, tenant_id: uuid.UUID, header: JobRequest, config: AppConfig,
                    max_item_bytes: int) -> ItemAppender:
        """Items of an NDJSON `POST /v1/jobs`: a new job, or the tenant's job of that name (its settings must
        agree), held by the name's lock until the caller's transaction ends."""
        job, created = _job_for_request(session, tenant_id, header)
        settings = header.settings if created else _settings_for_append(job, header)
        return cls(session, job, settings, config, max_item_bytes, created)

    def add(self, raw_items: list[Any]) -> None:
        items = check_items(raw_items, self.max_item_bytes, offset=self.added)
        if not self.created or self.added:  # a new job holds only this upload's earlier chunks
            _check_not_in_job(self.session, self.job, items, offset=self.added)
        ids, queued = _copy_items(self.session, self.job, self.settings, items, self.config, self.rules)
        self.first_id = self.first_id or ids[0]
        self.last_id = ids[-1]
        self.added += len(ids)
        self.queued += len(queued)

    def counts(self) -> dict[str, int]:
        return status_counts(self.queued, self.added - self.queued)


def queued_ids_between(session: Session, job_id: uuid.UUID, first: uuid.UUID, last: uuid.UUID,
                       chunk: int = DISPATCH_CHUNK) -> Iterator[list[str]]:
    """Ids of a job's queued tasks in [first, last] (one upload), a chunk at a time (server-side cursor)."""
    result = session.execute(
        select(Task.id).where(Task.job_id == job_id, Task.id >= first, Task.id <= last,
                              Task.status == TaskStatus.QUEUED)
        .order_by(Task.id).execution_options(yield_per=chunk))
    for partition in result.partitions():
        yield [str(row[0]) for row in partition]


def dispatch_in_chunks(send: Callable[[str, list[str]], Any], task_ids: Sequence[str],
                       chunk: int = DISPATCH_CHUNK) -> int:
    """One `DISPATCH_TASKS` message per chunk of task ids, never one per task; returns the count."""
    messages = 0
    for start in range(0, len(task_ids), chunk):
        send(DISPATCH_TASKS, list(task_ids[start:start + chunk]))
        messages += 1
    return messages


def cancel_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> int:
    """queued / waiting_batch → cancelled for every task of the job; returns how many moved."""
    job = get_job(session, tenant_id, job_id)
    return transitions.cancel_unstarted_of_job(session, job.id)
