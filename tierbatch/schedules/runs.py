"""A run's phases: its source read into a job, its answers checked, its results written.

1. **Starting a run** (`start_run`): in one transaction, the source is read as a stream in chunks;
   items already classified for this schedule (same item id and same sha256 of the text; pending or
   succeeded) are skipped by a unique index on `classifications`; the new ones become the tasks of a
   fresh job (COPY, through `tierbatch.jobs.store.ItemAppender`); the SQL cursor advances to the largest value
   read. All of it commits together, so the cursor advances only when the tasks are accepted. A
   source that cannot be read fails the run with the reason (nothing half-written stays behind).
2. **Finishing** (`finish_run`), once every task of the job is terminal: answers that are not one
   of the labels are asked once more (a retry job); then the classifications get their label,
   model and cost, the sink file is written, the run is `succeeded` (or `failed` with the reason)
   and the webhook, if any, is queued with the exact body to sign.

Each step locks the run row and checks its phase first, so a step sent twice does nothing the second
time. Nothing here sends messages; worker/schedules.py does, after each commit.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, timedelta
from decimal import Decimal

import psycopg
from sqlalchemy import exists, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Refused
from tierbatch.base.states import (
    LIVE_TASK_STATUSES,
    ClassificationStatus,
    Mode,
    RequestedTier,
    ScheduleRunPhase,
    ScheduleRunStatus,
    TaskStatus,
    WebhookStatus,
)
from tierbatch.db.models import Classification, Job, LedgerEntry, Schedule, ScheduleRun, Task, Tenant
from tierbatch.jobs.requests import JobSettings
from tierbatch.jobs.store import ItemAppender
from tierbatch.schedules.classifications import invalid_answers, record_results, text_hash
from tierbatch.schedules.file_sources import read_files, read_stored
from tierbatch.schedules.run_webhooks import webhook_payload
from tierbatch.schedules.sinks import sink_path, write_sink
from tierbatch.schedules.source_rows import SourceError, SourceRow
from tierbatch.schedules.sql_sources import CursorTracker, decode_cursor, encode_cursor, read_sql, unavailable
from tierbatch.schedules.store import database_now
from tierbatch.schedules.tenant_files import FILES_DISABLED, tenant_files

log = logging.getLogger(__name__)

RUN_CHUNK = 5000  # source rows per classification insert / COPY
# a run whose job is at work (first pass, or asking invalid answers again)
RUNNING_PHASES = (ScheduleRunPhase.CLASSIFYING, ScheduleRunPhase.RETRYING)


# --- starting a run: source → job ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunStep:
    """What a step did: `skipped` (nothing to do, or another worker holds the run), `classifying` /
    `retrying` (tasks to dispatch in `dispatch_job`), `waiting`, or `finished` (webhook to send)."""

    state: str
    dispatch_job: uuid.UUID | None = None
    webhook: bool = False



def run_job_settings(schedule: Schedule, run: ScheduleRun) -> JobSettings:
    job = schedule.job
    labels = job.get("labels")
    deadline_seconds = job.get("deadline_seconds")
    return JobSettings(
        task_type=job["task_type"], tier=RequestedTier(job["tier"]), urgent=bool(job["urgent"]),
        deadline=run.fire_time + timedelta(seconds=deadline_seconds) if deadline_seconds else None,
        params=dict(job.get("params") or {}), system=job.get("system"), template=job["template"],
        labels=tuple(labels) if labels is not None else None,
        metadata={**(job.get("metadata") or {}), "schedule_id": str(schedule.id), "schedule_run_id": str(run.id)})


def _job_name(schedule: Schedule, run: ScheduleRun, suffix: str = "") -> str:
    return f"schedule:{schedule.name}/{run.fire_time.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}{suffix}"


def _new_job(session: Session, schedule: Schedule, name: str, settings: JobSettings) -> Job:
    job = Job(id=uuid.uuid4(), tenant_id=schedule.tenant_id, name=name, task_type=settings.task_type,
              requested_tier=settings.tier, urgent=settings.urgent, deadline=settings.deadline,
              spec=settings.spec())
    session.add(job)
    session.flush()
    return job


def _chunks(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    chunk: list[SourceRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _source_rows(session: Session, schedule: Schedule, config: AppConfig, environ: Mapping[str, str],
                 own_database_url: str | None) -> Generator[SourceRow, None, None]:
    """The source's rows, every check of creation made again: the config, the grant or the files may have
    changed since (a file replaced by a symbolic link is refused here)."""
    source = schedule.source
    if source["type"] == "file":
        if source.get("file_id"):
            return read_stored(source, session, schedule.tenant_id)
        files = tenant_files(config, schedule.tenant_id)
        if files is None:
            raise SourceError(f"source.path: {FILES_DISABLED}")
        return read_files(source, files)
    name = source.get("source")
    if not isinstance(name, str):  # stored before sources were declared by the operator
        raise SourceError("source: this schedule names an environment variable (url_env); SQL sources are now "
                          "declared by the operator ([sources.NAME]): set source.source to one of them")
    declared = config.sources.get(name)
    tenant = session.get(Tenant, schedule.tenant_id)
    if declared is None or tenant is None or not declared.allows(tenant.id, tenant.name):
        raise unavailable(name)
    start = decode_cursor(schedule.cursor) if schedule.cursor is not None else source.get("cursor_start")
    return read_sql(source, start, declared, environ, own_database_url)


def _copy_new_items(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig,
                    settings: JobSettings, rows: Iterable[SourceRow], tracker: CursorTracker, counts: dict[str, int],
                    chunk_size: int) -> ItemAppender | None:
    max_bytes = config.limits.max_prompt_bytes
    appender: ItemAppender | None = None
    for chunk in _chunks(rows, chunk_size):
        fresh: dict[str, tuple[str, str]] = {}
        for row in chunk:
            counts["read"] += 1
            tracker.see(row.cursor)
            if row.text is None:
                counts["empty"] += 1
                continue
            if row.item_id in fresh:
                counts["duplicate"] += 1
                continue
            item_text = row.text.replace("\x00", "")
            if len(item_text) * 4 > max_bytes and len(item_text.encode("utf-8", "surrogatepass")) > max_bytes:
                counts["too_large"] += 1
                continue
            fresh[row.item_id] = (item_text, text_hash(item_text))
        if not fresh:
            continue
        inserted = set(session.execute(
            pg_insert(Classification).on_conflict_do_nothing().returning(Classification.item_id),
            [{"schedule_id": schedule.id, "run_id": run.id, "tenant_id": schedule.tenant_id, "item_id": item_id,
              "text_hash": digest, "status": ClassificationStatus.PENDING} for item_id, (_, digest) in fresh.items()],
        ).scalars())
        counts["already_classified"] += len(fresh) - len(inserted)
        new_items = [{"id": item_id, "text": value} for item_id, (value, _) in fresh.items() if item_id in inserted]
        if not new_items:
            continue
        if appender is None:
            job = _new_job(session, schedule, _job_name(schedule, run), settings)
            appender = ItemAppender.for_job(session, schedule.tenant_id, job.id, config, max_bytes)
        try:
            appender.add(new_items)
        except Refused as exc:  # a bad item, a duplicate id, the budget reached
            raise SourceError(f"an item of the source was refused: {exc.message}") from None
        counts["new"] += len(new_items)
    return appender


def _materialize(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig,
                 environ: Mapping[str, str], own_database_url: str | None, chunk_size: int) -> uuid.UUID | None:
    """Read the source and COPY the new items as the tasks of a new job; returns the job id (None: no items)."""
    settings = run_job_settings(schedule, run)
    tracker = CursorTracker()
    counts = {"read": 0, "new": 0, "already_classified": 0, "duplicate": 0, "empty": 0, "too_large": 0}
    rows = _source_rows(session, schedule, config, environ, own_database_url)
    try:
        appender = _copy_new_items(session, schedule, run, config, settings, rows, tracker, counts, chunk_size)
    finally:
        rows.close()  # a SQL source's connection is released now, not when the generator is collected
    job_id = appender.job.id if appender is not None else None
    if job_id is not None:
        session.execute(text(
            "UPDATE classifications AS c SET task_id = t.id FROM tasks AS t "
            "WHERE c.run_id = :run AND t.job_id = :job AND t.item_id = c.item_id"), {"run": run.id, "job": job_id})
    run.job_id = job_id
    run.task_count = counts["new"]
    run.skipped_count = counts["read"] - counts["new"]
    run.source_counts = counts
    if schedule.source["type"] == "sql" and schedule.source.get("cursor_field") and tracker.value is not None:
        schedule.cursor = encode_cursor(tracker.value)
    run.cursor_after = schedule.cursor
    return job_id


def start_run(session: Session, run_id: uuid.UUID, config: AppConfig, *, environ: Mapping[str, str],
              own_database_url: str | None = None, chunk_size: int = RUN_CHUNK
              ) -> RunStep:
    """Read the run's source and create its job, in the caller's transaction (commit, then dispatch)."""
    run = session.scalar(select(ScheduleRun).where(ScheduleRun.id == run_id).with_for_update(skip_locked=True))
    if run is None or run.status != ScheduleRunStatus.RUNNING or run.phase != ScheduleRunPhase.PENDING:
        return RunStep("skipped")
    schedule = session.scalar(select(Schedule).where(Schedule.id == run.schedule_id).with_for_update())
    if schedule is None:
        return RunStep("skipped")
    run.cursor_before = schedule.cursor
    reason: str | None = None
    try:
        with session.begin_nested():
            job_id = _materialize(session, schedule, run, config, environ, own_database_url, chunk_size)
    except SourceError as exc:
        reason = str(exc)
    except (OperationalError, psycopg.OperationalError):
        raise  # our own database is away: the run stays pending and the tick sends it again
    except Exception as exc:
        log.exception("schedule run %s: unexpected error while reading the source", run_id)
        reason = f"internal error while reading the source: {type(exc).__name__}: {exc}"
    if reason is not None:
        session.refresh(run)
        session.refresh(schedule)
        log.warning("schedule run %s failed: %s", run_id, reason)
        return _close(session, schedule, run, ScheduleRunStatus.FAILED, reason)
    if job_id is None:  # nothing new: the run is done already
        return _finalize(session, schedule, run, config)
    run.phase = ScheduleRunPhase.CLASSIFYING
    run.nudged_at = None
    run.updated_at = database_now(session)
    return RunStep("classifying", dispatch_job=job_id)


def queued_task_ids(session: Session, job_id: uuid.UUID, chunk: int = 1000) -> Iterator[list[str]]:
    """The job's queued tasks, a chunk at a time (keyset pages, each its own query)."""
    last: uuid.UUID | None = None
    while True:
        query = select(Task.id).where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
        if last is not None:
            query = query.where(Task.id > last)
        ids = list(session.scalars(query.order_by(Task.id).limit(chunk)))
        if not ids:
            return
        yield [str(i) for i in ids]
        last = ids[-1]


# --- finishing a run --------------------------------------------------------------------------------------

def _has_live_tasks(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> bool:
    # the tenant's live tasks are a small partial index (ix_tasks_tenant_live); all of a job's tasks may not be
    live = exists().where(Task.tenant_id == tenant_id, Task.job_id == job_id,
                          Task.status.in_(LIVE_TASK_STATUSES))
    return bool(session.scalar(select(live)))



def finish_run(session: Session, run_id: uuid.UUID, config: AppConfig) -> RunStep:
    """Once the run's tasks are all terminal: retry invalid answers once, then write the results."""
    run = session.scalar(select(ScheduleRun).where(ScheduleRun.id == run_id).with_for_update(skip_locked=True))
    if run is None or run.status != ScheduleRunStatus.RUNNING or run.phase not in RUNNING_PHASES:
        return RunStep("skipped")
    current = run.retry_job_id if run.phase == ScheduleRunPhase.RETRYING else run.job_id
    if current is not None and _has_live_tasks(session, run.tenant_id, current):
        return RunStep("waiting")
    schedule = session.get(Schedule, run.schedule_id)
    if schedule is None:
        return RunStep("skipped")
    if run.phase == ScheduleRunPhase.CLASSIFYING and run.job_id is not None and schedule.job.get("labels"):
        invalid = invalid_answers(session, run)
        if invalid:
            original = session.get(Job, run.job_id)
            assert original is not None
            settings = JobSettings.of_job(original)
            retry = _new_job(session, schedule, _job_name(schedule, run, " (retry)"), settings)
            appender = ItemAppender.for_job(session, schedule.tenant_id, retry.id, config,
                                            config.limits.max_prompt_bytes)
            appender.add([{"id": item_id, "messages": messages} for item_id, messages in invalid])
            session.execute(text(
                "UPDATE classifications AS c SET task_id = t.id FROM tasks AS t "
                "WHERE c.run_id = :run AND t.job_id = :job AND t.item_id = c.item_id"),
                {"run": run.id, "job": retry.id})
            run.retry_job_id = retry.id
            run.phase = ScheduleRunPhase.RETRYING
            run.nudged_at = None
            run.updated_at = database_now(session)
            log.info("schedule run %s: %d answers were not labels; asked once more", run.id, len(invalid))
            return RunStep("retrying", dispatch_job=retry.id)
    return _finalize(session, schedule, run, config)



def _finalize(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig) -> RunStep:
    labels = schedule.job.get("labels")
    record_results(session, run, labels)
    counts = {status: int(n) for status, n in session.execute(
        select(Classification.status, func.count()).where(Classification.run_id == run.id)
        .group_by(Classification.status))}
    run.counts = {"succeeded": counts.get(ClassificationStatus.SUCCEEDED, 0),
                  "failed": counts.get(ClassificationStatus.FAILED, 0)}
    if labels is not None:
        found = dict(session.execute(
            select(Classification.label, func.count()).where(Classification.run_id == run.id,
                                                            Classification.status == ClassificationStatus.SUCCEEDED)
            .group_by(Classification.label)).tuples().all())
        run.label_counts = {label: int(found.get(label, 0)) for label in labels}
    jobs = [j for j in (run.job_id, run.retry_job_id) if j is not None]
    if jobs:
        run.cost_usd = session.scalar(select(func.coalesce(func.sum(LedgerEntry.cost_usd), 0)).where(
            LedgerEntry.job_id.in_(jobs), LedgerEntry.mode != Mode.SHADOW))
    else:
        run.cost_usd = Decimal(0)
    status, error = ScheduleRunStatus.SUCCEEDED, None
    if schedule.sink is not None:
        try:
            run.sink_path = write_sink(session, schedule, run, config)
        except SourceError as exc:
            status, error = ScheduleRunStatus.FAILED, f"sink: {exc}"
        except OSError as exc:  # the OS reason only: no path of the operator's
            status = ScheduleRunStatus.FAILED
            error = f"sink: cannot write {sink_path(schedule, run)} ({exc.strerror or exc})"
        except ValueError as exc:
            status, error = ScheduleRunStatus.FAILED, f"sink: {exc}"
    return _close(session, schedule, run, status, error)


def _close(session: Session, schedule: Schedule, run: ScheduleRun, status: ScheduleRunStatus, error: str | None
           ) -> RunStep:
    finished = database_now(session)
    run.status = status
    run.phase = ScheduleRunPhase.DONE
    run.error = error
    run.finished_at = finished
    run.updated_at = finished
    if schedule.webhook_url:
        run.webhook_status = WebhookStatus.PENDING
        run.webhook_body = json.dumps(webhook_payload(schedule, run), ensure_ascii=False, separators=(",", ":"))
        run.nudged_at = finished
    return RunStep("finished", webhook=bool(schedule.webhook_url))
