"""A schedule's definition, validated: its cron expression and time zone (and the fire times they give),
the job template, the source and the sink.

A schedule is a cron expression in a time zone, a job template (task type, tier, labels, prompts …),
a source (tierbatch/schedules/file_sources.py: a file in the tenant's own directory or a file it uploaded;
tierbatch/schedules/sql_sources.py: a SQL source the operator declared and granted to it), an optional sink
(a JSONL/CSV file of the results, written inside the tenant's directory) and an optional signed webhook.
Every check of the source and sink made at creation is made again when the run reads or writes them.
"""

from __future__ import annotations

import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import InvalidInput, InvalidValue, Refused
from tierbatch.jobs.requests import parse_job_request
from tierbatch.schedules.tenant_files import FILES_DISABLED, PathRefused, has_glob, path_parts, tenant_files
from tierbatch.tasks.submission import invalid_input_from
from tierbatch.webhooks.targets import check_webhook_url

JOB_KEYS = ("task_type", "tier", "urgent", "deadline_seconds", "params", "system", "template", "labels",
            "metadata")
CRON_ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
SINK_FIELDS = frozenset({"run_id", "schedule_id", "schedule_name", "fire_time", "date"})


def invalid_field(param: str, message: str) -> InvalidValue:
    return InvalidValue(f"{param}: {message}", param=param)


def _prefixed(prefix: str, error: Refused) -> Refused:
    param = f"{prefix}.{error.param}" if error.param else prefix
    named = bool(error.param) and error.message.startswith(f"{error.param}:")
    message = f"{prefix}.{error.message}" if named else f"{param}: {error.message}"
    return error.reworded(message, param)


# --- cron and time zones -------------------------------------------------------------------------------

def check_timezone(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise invalid_field("timezone", "must be an IANA time zone name such as 'Europe/Paris' or 'UTC'")
    try:
        ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError for malformed keys, OSError for directories
        raise invalid_field("timezone", f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris' or 'UTC')"
                            ) from None
    return name


def check_cron(expression: Any) -> str:
    if not isinstance(expression, str) or not expression.strip():
        raise invalid_field("cron", "must be a cron expression such as '0 2 * * *' (minute hour day month weekday)")
    normalized = " ".join(expression.split())
    if normalized.startswith("@"):
        if normalized.lower() not in CRON_ALIASES:
            raise invalid_field("cron", f"unknown alias {normalized!r} (known: {', '.join(sorted(CRON_ALIASES))})")
        normalized = normalized.lower()
    elif len(normalized.split(" ")) != 5:
        raise invalid_field("cron", f"{expression!r} must have 5 fields (minute hour day-of-month month day-of-week), "
                                    f"not {len(normalized.split(' '))}")
    if not croniter.is_valid(normalized):
        raise invalid_field("cron", f"{expression!r} is not a valid cron expression")
    try:
        croniter(normalized, datetime.now(UTC)).get_next(datetime)
    except (CroniterBadDateError, CroniterBadCronError, CroniterError):
        raise invalid_field("cron", f"{expression!r} never fires") from None
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


def _no_sql_source(name: str) -> InvalidInput:
    # the same answer for a source that does not exist and one granted to others: nothing to learn
    return invalid_field("source.source", f"no SQL source named {name!r} is available to this tenant (the "
                                          "operator declares sources in [sources.NAME] of the config and grants them "
                                          "to tenants)")


def check_source(value: Any, config: AppConfig, scope: TenantScope) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_field("source", "must be an object with a type: 'file' or 'sql'")
    kind = value.get("type")
    if kind is None:
        raise invalid_field("source.type", "field required: 'file' or 'sql'")
    model: type[FileSourceSpec] | type[SqlSourceSpec]
    if kind == "file":
        model = FileSourceSpec
    elif kind == "sql":
        model = SqlSourceSpec
        if "url_env" in value:
            raise invalid_field("source.url_env", "a schedule names a SQL source the operator declared "
                                                  "([sources.NAME] in the config), not an environment variable: use "
                                                  "\"source\": \"NAME\"")
    else:
        raise invalid_field("source.type", f"unknown source type {kind!r} (known: 'file', 'sql')")
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
        raise invalid_field("source.file_id", "give either path (relative to your files directory) or file_id (an "
                                              "uploaded file), not both")
    if spec.path is None and spec.file_id is None:
        raise invalid_field("source.path", "field required: path (relative to your files directory) or file_id (a file "
                                           "uploaded with POST /v1/files, purpose user_data)")
    if spec.file_id is not None:
        if not FILE_ID.match(spec.file_id) or not scope.has_file(spec.file_id):
            raise invalid_field("source.file_id", f"there is no uploaded file {spec.file_id!r} (upload one with "
                                                  "POST /v1/files, purpose user_data)")
        return spec.model_dump(exclude={"path"})
    files = tenant_files(config, scope.id)
    if files is None:
        raise invalid_field("source.path", FILES_DISABLED)
    assert spec.path is not None
    try:
        files.probe(spec.path)
    except PathRefused as exc:
        raise invalid_field("source.path", str(exc)) from None
    return spec.model_dump(exclude={"file_id"})


def _placeholder(part: str) -> bool:
    return "{" in part or "}" in part


def check_sink(value: Any, config: AppConfig, scope: TenantScope) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("sink", "must be an object: {\"type\": \"file\", \"path\": \"out/{run_id}.jsonl\"}")
    if value.get("type") != "file":
        raise invalid_field("sink.type", f"unknown sink type {value.get('type')!r} (known: 'file')")
    try:
        spec = FileSinkSpec.model_validate(value)
    except ValidationError as exc:
        raise invalid_input_from(exc, ("sink",)) from None
    files = tenant_files(config, scope.id)
    if files is None:
        raise invalid_field("sink.path", FILES_DISABLED)
    if has_glob(spec.path):
        raise invalid_field("sink.path", "must name one file, not a pattern (* ? [ are not allowed)")
    try:
        files.probe(spec.path, dynamic=_placeholder)
    except PathRefused as exc:
        raise invalid_field("sink.path", str(exc)) from None
    return spec.model_dump()


def check_job(value: Any, max_item_bytes: int) -> dict[str, Any]:
    """The job template, normalized; validated by the same code as `POST /v1/jobs`."""
    if not isinstance(value, dict):
        raise invalid_field("job", "must be an object: task_type, tier, urgent, system, template, labels, params …")
    for key in value:
        if key == "deadline":
            raise invalid_field("job.deadline", "a schedule's jobs take a relative deadline: use deadline_seconds")
        if key not in JOB_KEYS:
            raise invalid_field(f"job.{key}", f"unknown field (known: {', '.join(JOB_KEYS)})")
    deadline_seconds = value.get("deadline_seconds")
    if deadline_seconds is not None and (isinstance(deadline_seconds, bool) or not isinstance(deadline_seconds, int)
                                         or not 0 < deadline_seconds <= 90 * 86_400):
        raise invalid_field("job.deadline_seconds", "must be a whole number of seconds between 1 and 7776000 (90 days)")
    fields = {k: v for k, v in value.items() if k != "deadline_seconds"}
    if fields.get("labels") is None and fields.get("task_type", "classification") == "classification":
        raise invalid_field("job.labels", "field required for a classification schedule: the list of labels to "
                                          "choose from (or set job.task_type to another kind of task)")
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
        raise invalid_field("name", "must be a non-empty name without NUL characters")
    cron = check_cron(fields.cron)
    timezone = check_timezone(fields.timezone)
    job = check_job(fields.job, config.limits.max_prompt_bytes)
    source = check_source(fields.source, config, scope)
    sink = check_sink(fields.sink, config, scope)
    webhook = check_webhook_url(fields.webhook_url)
    return ScheduleSpec(fields.name, cron, timezone, fields.enabled, job, source, sink, webhook)
