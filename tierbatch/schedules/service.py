"""Scheduled bulk classification.

A schedule is a cron expression in a time zone, a job template (task type, tier, labels, prompts …),
a source (tierbatch/schedules/sources.py: a file in the tenant's own directory, a file it uploaded, or a SQL source
the operator declared and granted to it), an optional sink (a JSONL/CSV file of the results, written
inside the tenant's directory) and an optional signed webhook. Every check of the source and sink made
at creation is made again when the run reads or writes them. Its life:

1. **Firing exactly once.** The beat tick (`fire_due`) takes the enabled schedules whose
   `next_fire_at` has passed (`FOR UPDATE SKIP LOCKED`) and inserts a run keyed by
   (schedule, fire time) — `UNIQUE(schedule_id, fire_time)` with `ON CONFLICT DO NOTHING` — so two
   beat processes, or a beat restarted with stale state, never start the same run twice.
   **Catch-up policy:** when the beat was down over several fire times, the next tick starts ONE
   run, for the latest fire time that has passed (`fire_time` says which); the missed slots are not
   run one by one. `next_fire_at` then moves to the first fire time after now.
2. **Starting a run** (`start_run`): in one transaction, the source is read as a stream in chunks;
   items already classified for this schedule (same item id and same sha256 of the text; pending or
   succeeded) are skipped by a unique index on `classifications`; the new ones become the tasks of a
   fresh job (COPY, through `tierbatch.jobs.store.ItemAppender`); the SQL cursor advances to the largest value
   read. All of it commits together, so the cursor advances only when the tasks are accepted. A
   source that cannot be read fails the run with the reason (nothing half-written stays behind).
3. **Finishing** (`finish_run`), once every task of the job is terminal: answers that are not one
   of the labels are asked once more (a retry job); then the classifications get their label,
   model and cost, the sink file is written, the run is `succeeded` (or `failed` with the reason)
   and the webhook, if any, is queued with the exact body to sign.

Nothing here sends messages; worker/schedules.py does, after each commit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import re
import stat
import string
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import psycopg
from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import delete, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.csv_safety import safe_row
from tierbatch.base.errors import Conflict, InvalidInput, InvalidValue, NotFound, Refused
from tierbatch.base.secretbox import SecretBox
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
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import Classification, Job, LedgerEntry, Schedule, ScheduleRun, Task, Tenant, WebhookDelivery
from tierbatch.jobs.store import ItemAppender, JobSettings, parse_job_request
from tierbatch.schedules.sources import (
    CursorTracker,
    PathRefused,
    SourceError,
    SourceRow,
    TenantFiles,
    cursor_json,
    decode_cursor,
    encode_cursor,
    has_glob,
    path_parts,
    read_files,
    read_sql,
    read_stored,
    unavailable,
    walk_directories,
)
from tierbatch.tasks.labels import extract_label, label_error
from tierbatch.tasks.submission import invalid_input_from
from tierbatch.webhooks.delivery import SCHEDULE_RUNS, attempts_of, resends_due
from tierbatch.webhooks.signing import new_secret, require_secret_box
from tierbatch.webhooks.targets import check_webhook_url

log = logging.getLogger(__name__)

RUN_CHUNK = 5000  # source rows per classification insert / COPY
JOB_KEYS = ("task_type", "tier", "urgent", "deadline_seconds", "params", "system", "template", "labels",
            "metadata")
CRON_ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
SINK_FIELDS = frozenset({"run_id", "schedule_id", "schedule_name", "fire_time", "date"})
# a run whose job is at work (first pass, or asking invalid answers again)
_RUNNING_PHASES = (ScheduleRunPhase.CLASSIFYING, ScheduleRunPhase.RETRYING)
# how long a message may go unanswered before the tick sends it again (lost in a Redis wipe or a crash)
RESEND_START_SECONDS = 60.0
RESEND_FINISH_SECONDS = 15.0
RESEND_WEBHOOK_SECONDS = 120.0


def _bad(param: str, message: str) -> InvalidValue:
    return InvalidValue(f"{param}: {message}", param=param)


def _prefixed(prefix: str, error: Refused) -> Refused:
    param = f"{prefix}.{error.param}" if error.param else prefix
    named = bool(error.param) and error.message.startswith(f"{error.param}:")
    message = f"{prefix}.{error.message}" if named else f"{param}: {error.message}"
    return error.reworded(message, param)


# --- cron and time zones -------------------------------------------------------------------------------

def check_timezone(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _bad("timezone", "must be an IANA time zone name such as 'Europe/Paris' or 'UTC'")
    try:
        ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError for malformed keys, OSError for directories
        raise _bad("timezone", f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris' or 'UTC')"
                   ) from None
    return name


def check_cron(expression: Any) -> str:
    if not isinstance(expression, str) or not expression.strip():
        raise _bad("cron", "must be a cron expression such as '0 2 * * *' (minute hour day month weekday)")
    normalized = " ".join(expression.split())
    if normalized.startswith("@"):
        if normalized.lower() not in CRON_ALIASES:
            raise _bad("cron", f"unknown alias {normalized!r} (known: {', '.join(sorted(CRON_ALIASES))})")
        normalized = normalized.lower()
    elif len(normalized.split(" ")) != 5:
        raise _bad("cron", f"{expression!r} must have 5 fields (minute hour day-of-month month day-of-week), "
                           f"not {len(normalized.split(' '))}")
    if not croniter.is_valid(normalized):
        raise _bad("cron", f"{expression!r} is not a valid cron expression")
    try:
        croniter(normalized, datetime.now(UTC)).get_next(datetime)
    except (CroniterBadDateError, CroniterBadCronError, CroniterError):
        raise _bad("cron", f"{expression!r} never fires") from None
    return normalized


def next_fire_after(cron: str, timezone: str, moment: datetime) -> datetime:
    """The first fire time strictly after `moment`, in UTC."""
    local = moment.astimezone(ZoneInfo(timezone))
    found: datetime = croniter(cron, local).get_next(datetime)
    return found.astimezone(UTC)


def latest_fire_at_or_before(cron: str, timezone: str, moment: datetime) -> datetime:
    """The last fire time at or before `moment`, in UTC."""
    local = (moment + timedelta(microseconds=1)).astimezone(ZoneInfo(timezone))
    found: datetime = croniter(cron, local).get_prev(datetime)
    return found.astimezone(UTC)


# --- validation ----------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _relative(value: str) -> str:
    try:
        path_parts(value)
    except PathRefused as exc:
        raise ValueError(str(exc)) from None
    return value


RelativePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_relative)]
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


class FileSourceSpec(_Strict):
    """A path (or glob) relative to the tenant's directory, or the id of a file it uploaded: one of them."""

    type: Literal["file"]
    path: RelativePath | None = None
    file_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    format: Literal["auto", "csv", "jsonl"] = "auto"
    id_field: Annotated[str, Field(min_length=1, max_length=200)] = "id"
    text_field: Annotated[str, Field(min_length=1, max_length=200)] = "text"


class SqlSourceSpec(_Strict):
    """A query on a source the operator declared in `[sources.NAME]` and granted to the tenant."""

    type: Literal["sql"]
    source: Annotated[str, Field(min_length=1, max_length=100)]
    query: Annotated[str, Field(min_length=1, max_length=100_000)]
    id_field: Annotated[str, Field(min_length=1, max_length=200)] = "id"
    text_field: Annotated[str, Field(min_length=1, max_length=200)] = "text"
    cursor_field: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    cursor_start: str | int | float | None = None

    @model_validator(mode="after")
    def _cursor_in_query(self) -> SqlSourceSpec:
        binds = ":cursor" in self.query
        if self.cursor_field is not None and not binds:
            raise ValueError("the query must use :cursor (e.g. WHERE updated_at > :cursor ORDER BY updated_at) "
                             "when cursor_field is set")
        if binds and self.cursor_field is None:
            raise ValueError("the query uses :cursor, so cursor_field (the column it is read from) is required")
        return self


class FileSinkSpec(_Strict):
    type: Literal["file"]
    path: RelativePath
    format: Literal["auto", "csv", "jsonl"] = "auto"

    @model_validator(mode="after")
    def _fields_and_format(self) -> FileSinkSpec:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.path) if name is not None}
        except ValueError as exc:
            raise ValueError(f"path: {exc} (use {{run_id}}, {{schedule_id}}, {{schedule_name}}, {{fire_time}}, "
                             "{date})") from None
        unknown = sorted(names - SINK_FIELDS)
        if unknown:
            raise ValueError(f"path: unknown placeholder {{{unknown[0]}}} (known: "
                             f"{', '.join('{' + n + '}' for n in sorted(SINK_FIELDS))})")
        if self.format == "auto" and not self.path.lower().endswith((".jsonl", ".csv")):
            raise ValueError("format: cannot tell from the path; end it in .jsonl or .csv or set format")
        return self

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "csv" if self.path.lower().endswith(".csv") else "jsonl"


class ScheduleFields(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    cron: str
    timezone: str = "UTC"
    enabled: bool = True
    job: Any
    source: Any
    sink: Any = None
    webhook_url: Any = None


@dataclass(frozen=True, slots=True)
class TenantScope:
    """Who a schedule belongs to, for the checks that depend on it: its directory, its granted SQL
    sources (by id or name) and its uploaded files (`has_file(file_id)`: the tenant's own user_data file)."""

    id: uuid.UUID
    name: str | None = None
    has_file: Callable[[str], bool] = lambda _file_id: False


FILES_DISABLED = ("file paths are disabled on this server: the operator enables them with [files] root = "
                  "\"/some/dir\" in the config (each tenant then reads and writes only <root>/<tenant id>/); "
                  "or upload the data (POST /v1/files, purpose user_data) and use source.file_id")


def tenant_files(config: AppConfig, tenant_id: uuid.UUID) -> TenantFiles | None:
    root = config.files.root
    return None if root is None else TenantFiles(root, tenant_id)


def _no_sql_source(name: str) -> InvalidInput:
    # the same answer for a source that does not exist and one granted to others: nothing to learn
    return _bad("source.source", f"no SQL source named {name!r} is available to this tenant (the operator "
                                 "declares sources in [sources.NAME] of the config and grants them to tenants)")


def check_source(value: Any, config: AppConfig, scope: TenantScope) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad("source", "must be an object with a type: 'file' or 'sql'")
    kind = value.get("type")
    if kind is None:
        raise _bad("source.type", "field required: 'file' or 'sql'")
    model: type[FileSourceSpec] | type[SqlSourceSpec]
    if kind == "file":
        model = FileSourceSpec
    elif kind == "sql":
        model = SqlSourceSpec
        if "url_env" in value:
            raise _bad("source.url_env", "a schedule names a SQL source the operator declared ([sources.NAME] in "
                                         "the config), not an environment variable: use \"source\": \"NAME\"")
    else:
        raise _bad("source.type", f"unknown source type {kind!r} (known: 'file', 'sql')")
    try:
        spec = model.model_validate(value)
    except ValidationError as exc:
        raise invalid_input_from(exc, ("source",)) from None
    if isinstance(spec, SqlSourceSpec):
        declared = config.sources.get(spec.source)
        if declared is None or not declared.allows(scope.id, scope.name):
            raise _no_sql_source(spec.source)
        return spec.model_dump()
    if spec.path is not None and spec.file_id is not None:
        raise _bad("source.file_id", "give either path (relative to your files directory) or file_id (an "
                                     "uploaded file), not both")
    if spec.path is None and spec.file_id is None:
        raise _bad("source.path", "field required: path (relative to your files directory) or file_id (a file "
                                  "uploaded with POST /v1/files, purpose user_data)")
    if spec.file_id is not None:
        if not FILE_ID.match(spec.file_id) or not scope.has_file(spec.file_id):
            raise _bad("source.file_id", f"there is no uploaded file {spec.file_id!r} (upload one with "
                                         "POST /v1/files, purpose user_data)")
        return spec.model_dump(exclude={"path"})
    files = tenant_files(config, scope.id)
    if files is None:
        raise _bad("source.path", FILES_DISABLED)
    assert spec.path is not None
    try:
        files.probe(spec.path)
    except PathRefused as exc:
        raise _bad("source.path", str(exc)) from None
    return spec.model_dump(exclude={"file_id"})


def _placeholder(part: str) -> bool:
    return "{" in part or "}" in part


def check_sink(value: Any, config: AppConfig, scope: TenantScope) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("sink", "must be an object: {\"type\": \"file\", \"path\": \"out/{run_id}.jsonl\"}")
    if value.get("type") != "file":
        raise _bad("sink.type", f"unknown sink type {value.get('type')!r} (known: 'file')")
    try:
        spec = FileSinkSpec.model_validate(value)
    except ValidationError as exc:
        raise invalid_input_from(exc, ("sink",)) from None
    files = tenant_files(config, scope.id)
    if files is None:
        raise _bad("sink.path", FILES_DISABLED)
    if has_glob(spec.path):
        raise _bad("sink.path", "must name one file, not a pattern (* ? [ are not allowed)")
    try:
        files.probe(spec.path, dynamic=_placeholder)
    except PathRefused as exc:
        raise _bad("sink.path", str(exc)) from None
    return spec.model_dump()


def check_job(value: Any, max_item_bytes: int) -> dict[str, Any]:
    """The job template, normalized; validated by the same code as `POST /v1/jobs`."""
    if not isinstance(value, dict):
        raise _bad("job", "must be an object: task_type, tier, urgent, system, template, labels, params …")
    for key in value:
        if key == "deadline":
            raise _bad("job.deadline", "a schedule's jobs take a relative deadline: use deadline_seconds")
        if key not in JOB_KEYS:
            raise _bad(f"job.{key}", f"unknown field (known: {', '.join(JOB_KEYS)})")
    deadline_seconds = value.get("deadline_seconds")
    if deadline_seconds is not None and (isinstance(deadline_seconds, bool) or not isinstance(deadline_seconds, int)
                                         or not 0 < deadline_seconds <= 90 * 86_400):
        raise _bad("job.deadline_seconds", "must be a whole number of seconds between 1 and 7776000 (90 days)")
    fields = {k: v for k, v in value.items() if k != "deadline_seconds"}
    if fields.get("labels") is None and fields.get("task_type", "classification") == "classification":
        raise _bad("job.labels", "field required for a classification schedule: the list of labels to choose from "
                                 "(or set job.task_type to another kind of task)")
    try:
        request = parse_job_request({**fields, "items": [{"id": "probe", "text": "probe"}]}, max_item_bytes)
    except Refused as exc:
        raise _prefixed("job", exc) from None
    settings = request.settings
    return {"task_type": settings.task_type, "tier": settings.tier.value, "urgent": settings.urgent,
            "deadline_seconds": deadline_seconds, "params": settings.params, "system": settings.system,
            "template": settings.template, "labels": list(settings.labels) if settings.labels is not None else None,
            "metadata": settings.metadata}


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    name: str
    cron: str
    timezone: str
    enabled: bool
    job: dict[str, Any]
    source: dict[str, Any]
    sink: dict[str, Any] | None
    webhook_url: str | None


def parse_schedule(payload: Any, config: AppConfig, scope: TenantScope) -> ScheduleSpec:
    """Validate a `POST /v1/schedules` body; raises InvalidInput naming the field. Stores nothing."""
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object (name, cron, timezone, job, source …)", param=None)
    try:
        fields = ScheduleFields.model_validate(payload)
    except ValidationError as exc:
        raise invalid_input_from(exc) from None
    if "\x00" in fields.name or not fields.name.strip():
        raise _bad("name", "must be a non-empty name without NUL characters")
    cron = check_cron(fields.cron)
    timezone = check_timezone(fields.timezone)
    job = check_job(fields.job, config.limits.max_prompt_bytes)
    source = check_source(fields.source, config, scope)
    sink = check_sink(fields.sink, config, scope)
    webhook = check_webhook_url(fields.webhook_url)
    return ScheduleSpec(fields.name, cron, timezone, fields.enabled, job, source, sink, webhook)


PATCH_KEYS = frozenset({"name", "cron", "timezone", "enabled", "job", "source", "sink", "webhook_url", "cursor"})


# --- schedules: create, read, change, delete ------------------------------------------------------------

def _now(session: Session) -> datetime:
    with session.no_autoflush:  # reading the clock needs no pending change written first
        value: datetime = session.scalar(select(func.clock_timestamp()))  # type: ignore[assignment]
    return value


def _name_taken(session: Session, tenant_id: uuid.UUID, name: str, other_than: uuid.UUID | None = None) -> None:
    query = select(Schedule.id).where(Schedule.tenant_id == tenant_id, Schedule.name == name)
    if other_than is not None:
        query = query.where(Schedule.id != other_than)
    if session.scalar(query) is not None:
        raise Conflict(f"name: a schedule named {name!r} already exists", param="name")


def create_schedule(session: Session, tenant_id: uuid.UUID, spec: ScheduleSpec, *,
                    box: SecretBox | None = None) -> tuple[Schedule, str | None]:
    """Store a validated schedule; returns it and its webhook secret (shown once, stored encrypted).
    Without a key (`box`) there is no secret, and a webhook_url is refused."""
    secret = new_secret() if box is not None else None
    if spec.webhook_url is not None:
        require_secret_box(box)
    _name_taken(session, tenant_id, spec.name)
    now = _now(session)
    schedule = Schedule(
        id=uuid.uuid4(), tenant_id=tenant_id, name=spec.name, cron=spec.cron, timezone=spec.timezone,
        enabled=spec.enabled, job=spec.job, source=spec.source, sink=spec.sink, webhook_url=spec.webhook_url,
        webhook_secret_encrypted=box.seal(secret) if box is not None and secret else None, cursor=None,
        next_fire_at=next_fire_after(spec.cron, spec.timezone, now) if spec.enabled else None,
    )
    session.add(schedule)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(f"name: a schedule named {spec.name!r} already exists", param="name") from None
    return schedule, secret


def get_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID, *, lock: bool = False) -> Schedule:
    query = select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    schedule = session.scalar(query)
    if schedule is None:
        raise NotFound(f"no schedule {schedule_id}")
    return schedule


def list_schedules(session: Session, tenant_id: uuid.UUID, *, limit: int,
                   after: tuple[datetime, uuid.UUID] | None) -> list[Schedule]:
    """Newest first, keyset-paginated on (created_at, id); up to limit + 1 rows."""
    return newest_first_page(session, select(Schedule).where(Schedule.tenant_id == tenant_id), Schedule,
                             limit=limit, after=after)


def update_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID, payload: Any,
                    config: AppConfig, scope: TenantScope) -> Schedule:
    """PATCH: the given fields are validated like at creation; `"cursor": null` resets a SQL cursor."""
    if not isinstance(payload, dict) or not payload:
        raise InvalidInput("the body must be a JSON object with the fields to change", param=None)
    for key in payload:
        if key not in PATCH_KEYS:
            raise _bad(key, f"unknown or read-only field (changeable: {', '.join(sorted(PATCH_KEYS))})")
    schedule = get_schedule(session, tenant_id, schedule_id, lock=True)
    merged = {"name": schedule.name, "cron": schedule.cron, "timezone": schedule.timezone,
              "enabled": schedule.enabled, "job": schedule.job, "source": schedule.source, "sink": schedule.sink,
              "webhook_url": schedule.webhook_url}
    merged.update({k: v for k, v in payload.items() if k != "cursor"})
    if "enabled" in payload and not isinstance(payload["enabled"], bool):
        raise _bad("enabled", "must be true or false")
    spec = parse_schedule(merged, config, scope)
    if "cursor" in payload:
        if payload["cursor"] is not None:
            raise _bad("cursor", "only null is accepted: it resets the cursor (the next run reads from cursor_start)")
        schedule.cursor = None
    if spec.name != schedule.name:
        _name_taken(session, tenant_id, spec.name, other_than=schedule.id)
    timing_changed = (spec.cron, spec.timezone, spec.enabled) != (schedule.cron, schedule.timezone, schedule.enabled)
    schedule.name, schedule.cron, schedule.timezone = spec.name, spec.cron, spec.timezone
    schedule.enabled, schedule.job, schedule.source = spec.enabled, spec.job, spec.source
    schedule.sink, schedule.webhook_url = spec.sink, spec.webhook_url
    if timing_changed:
        schedule.next_fire_at = next_fire_after(spec.cron, spec.timezone, _now(session)) if spec.enabled else None
    schedule.updated_at = _now(session)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(f"name: a schedule named {spec.name!r} already exists", param="name") from None
    return schedule


def delete_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID) -> None:
    """The schedule, its runs, classifications and webhook attempts go; its jobs (and costs) stay."""
    schedule = get_schedule(session, tenant_id, schedule_id, lock=True)
    session.execute(delete(Schedule).where(Schedule.id == schedule.id))


# --- firing ---------------------------------------------------------------------------------------------

def _insert_run(session: Session, schedule: Schedule, fire_time: datetime, trigger: str) -> uuid.UUID | None:
    """The run of (schedule, fire time), or None when it exists already (another beat made it)."""
    run_id: uuid.UUID | None = session.execute(
        pg_insert(ScheduleRun).values(
            id=uuid.uuid4(), schedule_id=schedule.id, tenant_id=schedule.tenant_id, fire_time=fire_time,
            trigger=trigger, status=ScheduleRunStatus.RUNNING, phase=ScheduleRunPhase.PENDING,
            task_count=0, skipped_count=0,
            nudged_at=func.now())
        .on_conflict_do_nothing(constraint="uq_schedule_runs_schedule_fire_time")
        .returning(ScheduleRun.id)
    ).scalar()
    return run_id


def fire_due(session: Session, now: datetime, limit: int = 500) -> list[uuid.UUID]:
    """Start the runs of every schedule due at `now` (one per schedule: the catch-up policy)."""
    due = session.scalars(
        select(Schedule).where(Schedule.enabled, Schedule.next_fire_at <= now)
        .order_by(Schedule.next_fire_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    created: list[uuid.UUID] = []
    for schedule in due:
        try:
            fire_time = latest_fire_at_or_before(schedule.cron, schedule.timezone, now)
            following = next_fire_after(schedule.cron, schedule.timezone, now)
        except Exception:  # a schedule that cannot be computed must not stop the others (nor the beat)
            log.exception("schedule %s: cannot compute its fire times; retried in an hour", schedule.id)
            schedule.next_fire_at = now + timedelta(hours=1)
            continue
        run_id = _insert_run(session, schedule, fire_time, "cron")
        if run_id is not None:
            created.append(run_id)
            log.info("schedule %s (%s): run %s for %s", schedule.id, schedule.name, run_id, fire_time.isoformat())
        schedule.next_fire_at = following
        if schedule.last_fire_at is None or fire_time > schedule.last_fire_at:
            schedule.last_fire_at = fire_time
    return created


def request_run(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID) -> ScheduleRun:
    """`POST /v1/schedules/{id}/run`: a manual run now (also for a disabled schedule)."""
    schedule = get_schedule(session, tenant_id, schedule_id)
    run_id = _insert_run(session, schedule, _now(session), "manual")
    if run_id is None:  # two manual runs in the same microsecond: the other one is this run
        raise Conflict("a run of this schedule was just started; try again")
    run = session.get(ScheduleRun, run_id)
    assert run is not None
    return run


# --- starting a run: source → job ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunStep:
    """What a step did: `skipped` (nothing to do, or another worker holds the run), `classifying` /
    `retrying` (tasks to dispatch in `dispatch_job`), `waiting`, or `finished` (webhook to send)."""

    state: str
    dispatch_job: uuid.UUID | None = None
    webhook: bool = False


def text_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


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
            appender = ItemAppender(session, schedule.tenant_id, job.id, config, max_bytes)
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
    run.updated_at = _now(session)
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


def _invalid_answers(session: Session, run: ScheduleRun) -> list[tuple[str, list[dict[str, Any]]]]:
    """Items whose task failed because the answer was not one of the labels: (item id, messages)."""
    rows = session.execute(
        select(Classification.item_id, Task.request, Task.output)
        .join(Task, Task.id == Classification.task_id)
        .where(Classification.run_id == run.id, Task.status == TaskStatus.FAILED, Task.output.is_not(None))
    ).all()
    return [(item_id, request["messages"]) for item_id, request, output in rows
            if isinstance(request, dict) and request.get("messages") and label_error(request, output) is not None]


def finish_run(session: Session, run_id: uuid.UUID, config: AppConfig) -> RunStep:
    """Once the run's tasks are all terminal: retry invalid answers once, then write the results."""
    run = session.scalar(select(ScheduleRun).where(ScheduleRun.id == run_id).with_for_update(skip_locked=True))
    if run is None or run.status != ScheduleRunStatus.RUNNING or run.phase not in _RUNNING_PHASES:
        return RunStep("skipped")
    current = run.retry_job_id if run.phase == ScheduleRunPhase.RETRYING else run.job_id
    if current is not None and _has_live_tasks(session, run.tenant_id, current):
        return RunStep("waiting")
    schedule = session.get(Schedule, run.schedule_id)
    if schedule is None:
        return RunStep("skipped")
    if run.phase == ScheduleRunPhase.CLASSIFYING and run.job_id is not None and schedule.job.get("labels"):
        invalid = _invalid_answers(session, run)
        if invalid:
            original = session.get(Job, run.job_id)
            assert original is not None
            settings = JobSettings.of_job(original)
            retry = _new_job(session, schedule, _job_name(schedule, run, " (retry)"), settings)
            appender = ItemAppender(session, schedule.tenant_id, retry.id, config, config.limits.max_prompt_bytes)
            appender.add([{"id": item_id, "messages": messages} for item_id, messages in invalid])
            session.execute(text(
                "UPDATE classifications AS c SET task_id = t.id FROM tasks AS t "
                "WHERE c.run_id = :run AND t.job_id = :job AND t.item_id = c.item_id"),
                {"run": run.id, "job": retry.id})
            run.retry_job_id = retry.id
            run.phase = ScheduleRunPhase.RETRYING
            run.nudged_at = None
            run.updated_at = _now(session)
            log.info("schedule run %s: %d answers were not labels; asked once more", run.id, len(invalid))
            return RunStep("retrying", dispatch_job=retry.id)
    return _finalize(session, schedule, run, config)


def _record_results(session: Session, run: ScheduleRun, labels: Sequence[str] | None, page: int = 5000) -> None:
    """classifications ← their tasks (label, raw answer, model, cost, status), a page at a time."""
    last = 0
    while True:
        rows = session.execute(
            select(Classification.id, Task.status, Task.output, Task.served_model, Task.cost_usd, Task.error,
                   Task.finished_at)
            .outerjoin(Task, Task.id == Classification.task_id)
            .where(Classification.run_id == run.id, Classification.id > last)
            .order_by(Classification.id).limit(page)
        ).all()
        if not rows:
            return
        ids, statuses, answers, outputs, models, costs, errors, times = [], [], [], [], [], [], [], []
        for cid, status, output, model, cost, error, finished in rows:
            label: str | None = None
            kept: str | None = output
            if status == TaskStatus.SUCCEEDED:
                if labels is not None:
                    label = extract_label(output, labels)
                    if label is None:
                        status, error = TaskStatus.FAILED, f"answer {(output or '')[:200]!r} is not one of the labels"
                    else:
                        kept = None  # the label says it all
            elif status is None:
                error = "the item's task is missing"
            elif status == TaskStatus.CANCELLED:
                error = error or "cancelled"
            ids.append(cid)
            statuses.append(ClassificationStatus.SUCCEEDED if status == TaskStatus.SUCCEEDED
                            else ClassificationStatus.FAILED)
            answers.append(label)
            outputs.append(kept)
            models.append(model)
            costs.append(cost)
            errors.append(error)
            times.append(finished)
        session.execute(text(
            "UPDATE classifications AS c SET status = v.status, label = v.label, output = v.output, "
            "  model = v.model, cost_usd = v.cost_usd, error = v.error, classified_at = v.finished_at "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS classification_status[]), CAST(:labels AS text[]), "
            "            CAST(:outputs AS text[]), CAST(:models AS text[]), CAST(:costs AS numeric[]), "
            "            CAST(:errors AS text[]), CAST(:times AS timestamptz[])) "
            "  AS v(id, status, label, output, model, cost_usd, error, finished_at) "
            "WHERE c.id = v.id"),
            {"ids": ids, "statuses": statuses, "labels": answers, "outputs": outputs, "models": models,
             "costs": costs, "errors": errors, "times": times})
        last = ids[-1]


def iter_classifications(session: Session, run_id: uuid.UUID, page: int = 5000) -> Iterator[list[Classification]]:
    last = 0
    while True:
        rows = list(session.scalars(select(Classification).where(Classification.run_id == run_id,
                                                                 Classification.id > last)
                                    .order_by(Classification.id).limit(page)))
        if not rows:
            return
        yield rows
        last = rows[-1].id


SINK_COLUMNS = ("item_id", "status", "label", "output", "model", "cost_usd", "error", "task_id")


def sink_path(schedule: Schedule, run: ScheduleRun) -> str:
    """The sink path of this run, relative to the tenant's directory (placeholders filled)."""
    fire = run.fire_time.astimezone(UTC)
    # a name of dots would climb out ("..") once put in a path: leading dots go too
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", schedule.name).lstrip(".") or "_"
    assert schedule.sink is not None
    return str(schedule.sink["path"]).format(run_id=run.id, schedule_id=schedule.id, schedule_name=safe_name,
                                             fire_time=fire.strftime("%Y%m%dT%H%M%SZ"), date=fire.strftime("%Y-%m-%d"))


def _sink_rows(session: Session, run: ScheduleRun, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    for page in iter_classifications(session, run.id):
        for c in page:
            row = {"item_id": c.item_id, "status": c.status, "label": c.label, "output": c.output,
                   "model": c.model, "cost_usd": _money(c.cost_usd), "error": c.error,
                   "task_id": str(c.task_id) if c.task_id else None}
            yield {k: row[k] for k in columns}


def write_sink(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig) -> str:
    """The run's results as JSONL or CSV at the sink path inside the tenant's directory; returns that
    relative path. Every directory is opened without following links (missing ones are made inside);
    the content goes to a new file (O_CREAT|O_EXCL|O_NOFOLLOW) renamed over the name in the same
    directory, so a link planted at the name is replaced, never written through."""
    assert schedule.sink is not None
    files = tenant_files(config, schedule.tenant_id)
    if files is None:
        raise SourceError(FILES_DISABLED)
    path = sink_path(schedule, run)
    parts = path_parts(path)
    kind = FileSinkSpec.model_validate(schedule.sink).resolved_format
    labelled = schedule.job.get("labels") is not None
    columns = [c for c in SINK_COLUMNS if c != ("output" if labelled else "label")]
    top = files.open_directory(create=True)
    try:
        directory = walk_directories(top, parts[:-1], create=True)
    finally:
        os.close(top)
    name = parts[-1]
    temporary = f".tierbatch-{uuid.uuid4().hex}.tmp"
    try:
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
                raise PathRefused(f"{path} is a symbolic link, which is not allowed")
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
                if kind == "csv":
                    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
                    writer.writeheader()
                    for row in _sink_rows(session, run, columns):
                        writer.writerow(safe_row(row))  # no cell a spreadsheet would run as a formula
                else:
                    for row in _sink_rows(session, run, columns):
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fchmod(out.fileno(), 0o644)
            os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=directory)
            raise
    finally:
        os.close(directory)
    return "/".join(parts)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def _finalize(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig) -> RunStep:
    labels = schedule.job.get("labels")
    _record_results(session, run, labels)
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
    finished = _now(session)
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


# --- webhooks -----------------------------------------------------------------------------------------------

def run_summary(run: ScheduleRun) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": str(run.id), "object": "schedule_run", "schedule_id": str(run.schedule_id),
        "fire_time": stamp(run.fire_time), "trigger": run.trigger, "status": run.status, "phase": run.phase,
        "job_id": str(run.job_id) if run.job_id else None,
        "retry_job_id": str(run.retry_job_id) if run.retry_job_id else None,
        "task_count": run.task_count, "skipped_count": run.skipped_count, "source_counts": run.source_counts,
        "counts": run.counts, "label_counts": run.label_counts, "cost_usd": _money(run.cost_usd),
        "cursor_before": cursor_json(run.cursor_before), "cursor_after": cursor_json(run.cursor_after),
        "sink_path": run.sink_path, "error": run.error, "webhook_status": run.webhook_status,
        "created_at": stamp(run.created_at), "finished_at": stamp(run.finished_at),
    }


def webhook_payload(schedule: Schedule, run: ScheduleRun) -> dict[str, Any]:
    summary = run_summary(run)
    summary.pop("webhook_status")
    return {"type": "schedule_run.finished", "schedule": {"id": str(schedule.id), "name": schedule.name},
            "run": summary,
            "results_url": f"/v1/jobs/{run.job_id}/results" if run.job_id else None}


# The attempts themselves (what to send, the record of each, resends) are tierbatch/webhooks/delivery.py's outbox,
# shared with the job webhooks: `SCHEDULE_RUNS` keeps the state on the run row.

def webhook_attempts(session: Session, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[WebhookDelivery]]:
    return attempts_of(session, SCHEDULE_RUNS, run_ids)


# --- the tick's housekeeping: messages that were lost -----------------------------------------------------

@dataclass
class Nudges:
    start: list[uuid.UUID] = field(default_factory=list)
    finish: list[uuid.UUID] = field(default_factory=list)
    webhooks: list[tuple[uuid.UUID, int]] = field(default_factory=list)


def runs_to_nudge(session: Session, limit: int = 200) -> Nudges:
    """Runs whose next step is due: finish when the job is done, and resends after a lost message."""
    nudges = Nudges()
    now = func.now()

    def stale(seconds: float) -> Any:
        return or_(ScheduleRun.nudged_at.is_(None),
                   ScheduleRun.nudged_at < now - func.make_interval(0, 0, 0, 0, 0, 0, seconds))

    nudges.start = list(session.scalars(
        update(ScheduleRun).where(ScheduleRun.id.in_(
            select(ScheduleRun.id).where(ScheduleRun.status == ScheduleRunStatus.RUNNING,
                                         ScheduleRun.phase == ScheduleRunPhase.PENDING,
                                         stale(RESEND_START_SECONDS)).limit(limit).scalar_subquery()))
        .values(nudged_at=now).returning(ScheduleRun.id)))
    current_job = func.coalesce(ScheduleRun.retry_job_id, ScheduleRun.job_id)
    live = exists().where(Task.tenant_id == ScheduleRun.tenant_id, Task.job_id == current_job,
                          Task.status.in_(LIVE_TASK_STATUSES))
    nudges.finish = list(session.scalars(
        update(ScheduleRun).where(ScheduleRun.id.in_(
            select(ScheduleRun.id).where(ScheduleRun.status == ScheduleRunStatus.RUNNING,
                                         ScheduleRun.phase.in_(_RUNNING_PHASES),
                                         stale(RESEND_FINISH_SECONDS), ~live).limit(limit).scalar_subquery()))
        .values(nudged_at=now).returning(ScheduleRun.id)))
    nudges.webhooks = resends_due(session, SCHEDULE_RUNS, RESEND_WEBHOOK_SECONDS, limit)
    return nudges


# --- reading ------------------------------------------------------------------------------------------------

def list_runs(session: Session, schedule_id: uuid.UUID, *, limit: int,
              after: tuple[datetime, uuid.UUID] | None) -> list[ScheduleRun]:
    return newest_first_page(session, select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id),
                             ScheduleRun, limit=limit, after=after)


def get_run(session: Session, schedule: Schedule, run_id: uuid.UUID) -> ScheduleRun:
    run = session.scalar(select(ScheduleRun).where(ScheduleRun.id == run_id, ScheduleRun.schedule_id == schedule.id))
    if run is None:
        raise NotFound(f"no run {run_id} of schedule {schedule.id}")
    return run
