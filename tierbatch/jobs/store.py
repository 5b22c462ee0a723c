"""Bulk jobs: validate a job request, store its tasks with one COPY, read it back.

Speed matters here (the target is ≥ 20,000 tasks/s through `POST /v1/jobs`), so the up to 100,000
items of a request are checked by a tight loop rather than one pydantic model each, and every
task's request body is the job's pre-serialized JSON with the item's text spliced in.

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

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Text, any_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, InvalidInput, InvalidValue, NotFound, TooLarge
from tierbatch.base.messaging import DISPATCH_CHUNK, DISPATCH_TASKS
from tierbatch.base.states import TERMINAL_TASK_STATUSES, Mode, RequestedTier, TaskStatus, Tier
from tierbatch.costs.budgets import check_budget
from tierbatch.db.bulk_sql import COPY_TASKS
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import Job, LedgerEntry, Task
from tierbatch.routing.rules import RuleView, rule_decision, tenant_rules
from tierbatch.routing.tiers import resolve_tier
from tierbatch.tasks import transitions
from tierbatch.tasks.submission import ChatParams, Deadline, TaskMetadata, check_content_parts, invalid_input_from
from tierbatch.webhooks.delivery import check_webhook_url

MAX_ITEMS_PER_REQUEST = 100_000
MAX_ITEM_ID_CHARS = 1000
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
TEXT_PLACEHOLDER = "{text}"
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_ITEM_KEYS = frozenset({"id", "text", "messages"})
_SETTING_KEYS = ("task_type", "tier", "urgent", "deadline", "params", "system", "template", "labels",
                 "metadata")
# Marks where an item's text goes in the pre-serialized request; json.dumps escapes it as \u0001.
_SLOT = "\x01tierbatch-text\x01"

_QUEUED = TaskStatus.QUEUED.value  # a plain str: the COPY's rows are built per item on a benchmarked path


# --- the request -------------------------------------------------------------------------------

class JobFields(BaseModel):
    """Everything of `POST /v1/jobs` but the items (those are checked by `_check_items`)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    task_type: Annotated[str, Field(min_length=1, max_length=100)] = "general"
    tier: RequestedTier = RequestedTier.AUTO
    urgent: bool = False
    deadline: Deadline = None
    params: ChatParams = Field(default_factory=ChatParams)
    system: Annotated[str, Field(min_length=1)] | None = None
    template: str = TEXT_PLACEHOLDER
    labels: list[str] | None = None
    metadata: TaskMetadata = Field(default_factory=dict)
    webhook_url: Any = None  # checked by webhooks.delivery.check_webhook_url (one message for jobs and schedules)

    @field_validator("template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if TEXT_PLACEHOLDER not in value:
            raise ValueError("the template must contain {text}, where each item's text goes")
        return value


@dataclass(frozen=True, slots=True)
class JobSettings:
    """How every task of a job is built; stored on the job (`jobs` columns + `spec`)."""

    task_type: str = "general"
    tier: RequestedTier = RequestedTier.AUTO
    urgent: bool = False
    deadline: datetime | None = None
    params: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str = TEXT_PLACEHOLDER
    labels: tuple[str, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        return {"params": self.params, "system": self.system, "template": self.template,
                "labels": list(self.labels) if self.labels is not None else None, "metadata": self.metadata}

    def value_of(self, key: str) -> Any:
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    @classmethod
    def of_job(cls, job: Job) -> JobSettings:
        spec = job.spec or {}
        labels = spec.get("labels")
        return cls(task_type=job.task_type, tier=job.requested_tier, urgent=job.urgent, deadline=job.deadline,
                   params=dict(spec.get("params") or {}), system=spec.get("system"),
                   template=spec.get("template") or TEXT_PLACEHOLDER,
                   labels=tuple(labels) if labels is not None else None, metadata=dict(spec.get("metadata") or {}))


@dataclass(frozen=True, slots=True)
class JobItem:
    id: str
    text: str | None
    messages: list[dict[str, Any]] | None


@dataclass(frozen=True, slots=True)
class JobRequest:
    name: str | None
    settings: JobSettings
    given: frozenset[str]  # the settings the request named; an append must agree on those
    items: list[JobItem]
    webhook_url: str | None = None  # where `job.finished` goes; set when the job is created


def _bad(param: str, message: str, kind: type[InvalidInput] = InvalidValue) -> InvalidInput:
    return kind(f"{param}: {message}", param=param)


def _check_labels(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _bad("labels", "must be a non-empty list of distinct strings")
    if len(value) > MAX_LABELS:
        raise _bad("labels", f"at most {MAX_LABELS} labels (got {len(value)})")
    seen: dict[str, int] = {}
    for index, label in enumerate(value):
        if not isinstance(label, str) or not label.strip():
            raise _bad(f"labels[{index}]", "each label must be a non-empty string")
        if len(label) > MAX_LABEL_CHARS or "\x00" in label:
            raise _bad(f"labels[{index}]", f"a label is at most {MAX_LABEL_CHARS} characters, without NUL")
        if label in seen:
            raise _bad(f"labels[{index}]", f"duplicate label {label!r} (also labels[{seen[label]}])")
        seen[label] = index
    return tuple(value)


def _check_text_value(param: str, value: str, max_bytes: int) -> None:
    if "\x00" in value:
        raise _bad(param, "must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _bad(param, "is not valid Unicode (lone surrogate)") from None
    if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
        raise _bad(param, f"{len(value.encode())} bytes is over the limit of {max_bytes} bytes", TooLarge)


def _check_messages(param: str, messages: Any, max_bytes: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad(param, "must be a non-empty list of chat messages")
    for index, message in enumerate(messages):
        where = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise _bad(where, "a chat message must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_ROLES:  # a list or an object cannot be looked up
            raise _bad(f"{where}.role", f"must be one of {', '.join(sorted(_MESSAGE_ROLES))}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"{where}.content", "must be a string or a list of content parts")
        problem = check_content_parts(content) if isinstance(content, list) else None
        if problem is not None:
            raise _bad(f"{where}.content{problem[0]}", problem[1])
    try:
        size = len(json.dumps(messages, ensure_ascii=False).encode())
    except (TypeError, ValueError, UnicodeEncodeError):
        raise _bad(param, "is not valid JSON text") from None
    if "\\u0000" in json.dumps(messages):
        raise _bad(param, "must not contain NUL characters")
    if size > max_bytes:
        raise _bad(param, f"{size} bytes is over the limit of {max_bytes} bytes", TooLarge)
    return messages


def _item_error(index: int, item: Any, max_bytes: int) -> InvalidInput:
    """The slow path: say exactly what is wrong with one item."""
    where = f"items[{index}]"
    if not isinstance(item, dict):
        return _bad(where, "each item must be an object: {\"id\", \"text\"} or {\"id\", \"messages\"}")
    unknown = sorted(set(item) - _ITEM_KEYS)
    if unknown:
        return _bad(f"{where}.{unknown[0]}", "unknown field (an item has 'id' and 'text' or 'messages')")
    item_id = item.get("id")
    if item_id is None:
        return _bad(f"{where}.id", "field required")
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        return _bad(f"{where}.id", "must be a string or an integer")
    if isinstance(item_id, str):
        if not item_id.strip():
            return _bad(f"{where}.id", "must not be empty")
        if len(item_id) > MAX_ITEM_ID_CHARS:
            return _bad(f"{where}.id", f"at most {MAX_ITEM_ID_CHARS} characters")
        try:
            _check_text_value(f"{where}.id", item_id, max_bytes)
        except InvalidInput as exc:
            return exc
    has_text, has_messages = "text" in item, "messages" in item
    if has_text == has_messages:
        return _bad(where, "give either 'text' or 'messages'" + (", not both" if has_text else ""))
    if has_text:
        value = item["text"]
        if not isinstance(value, str):
            return _bad(f"{where}.text", "must be a string")
        if not value.strip():
            return _bad(f"{where}.text", "must not be empty")
        try:
            _check_text_value(f"{where}.text", value, max_bytes)
        except InvalidInput as exc:
            return exc
    else:
        try:
            _check_messages(f"{where}.messages", item["messages"], max_bytes)
        except InvalidInput as exc:
            return exc
    return _bad(where, "invalid item")  # not reached for an item the fast path refused


def _check_items(items: list[Any], max_bytes: int, offset: int = 0) -> list[JobItem]:
    """One pass over the items; the common case costs a few dict lookups per item.

    `offset` is the position of `items[0]` in the whole upload, for error messages.
    """
    if offset:
        try:
            return _check_items(items, max_bytes)
        except InvalidInput as exc:
            raise _shifted(exc, offset) from None
    out: list[JobItem] = []
    append = out.append
    first_at: dict[str, int] = {}
    text_limit = max_bytes // 4  # a str of n chars is at most 4n bytes of UTF-8
    for index, item in enumerate(items):
        if type(item) is not dict or len(item) != 2:
            raise _item_error(index, item, max_bytes)
        item_id = item.get("id")
        if type(item_id) is str:
            if not item_id or len(item_id) > MAX_ITEM_ID_CHARS or "\x00" in item_id or not item_id.strip() \
                    or (not item_id.isascii() and _surrogates(item_id)):
                raise _item_error(index, item, max_bytes)
        elif type(item_id) is int:
            item_id = str(item_id)
        else:
            raise _item_error(index, item, max_bytes)
        value = item.get("text")
        if value is not None:
            if type(value) is not str or not value.strip() or "\x00" in value or len(value) > text_limit \
                    or (not value.isascii() and _surrogates(value)):
                raise _item_error(index, item, max_bytes)
            job_item = JobItem(item_id, value, None)
        else:
            messages = item.get("messages")
            if messages is None:
                raise _item_error(index, item, max_bytes)
            job_item = JobItem(item_id, None, _check_messages(f"items[{index}].messages", messages, max_bytes))
        previous = first_at.setdefault(item_id, index)
        if previous != index:
            raise InvalidValue(f"items[{index}].id: duplicate item id {item_id!r} (also items[{previous}])",
                               param=f"items[{index}].id")
        append(job_item)
    return out


_POSITION = re.compile(r"items\[(\d+)\]")


def _shifted(error: InvalidInput, offset: int) -> InvalidInput:
    """The same error with every `items[i]` moved by `offset`."""
    def shift(text_value: str | None) -> str | None:
        if text_value is None:
            return None
        return _POSITION.sub(lambda m: f"items[{int(m.group(1)) + offset}]", text_value)

    return error.reworded(shift(error.message) or error.message, shift(error.param))


def _surrogates(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def parse_job_request(payload: Any, max_item_bytes: int, max_items: int = MAX_ITEMS_PER_REQUEST) -> JobRequest:
    """Validate a `POST /v1/jobs` body; raises InvalidInput naming the field. Stores nothing."""
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object with 'items'", param=None)
    items = payload.get("items")
    if "items" not in payload:
        raise _bad("items", "field required: a list of {\"id\", \"text\"} or {\"id\", \"messages\"}")
    if not isinstance(items, list):
        raise _bad("items", "must be a list of {\"id\", \"text\"} or {\"id\", \"messages\"}")
    if not items:
        raise _bad("items", "must hold at least one item")
    if len(items) > max_items:
        raise _bad("items", f"at most {max_items} items per request (got {len(items)}); send several "
                            "requests with the same name, or upload NDJSON", TooLarge)
    fields = {k: v for k, v in payload.items() if k != "items"}
    labels = _check_labels(fields.get("labels"))
    try:
        parsed = JobFields.model_validate(fields)
    except ValidationError as exc:
        raise invalid_input_from(exc) from None
    for param, value in (("system", parsed.system), ("template", parsed.template), ("name", parsed.name)):
        if value is not None:
            _check_text_value(param, value, max_item_bytes)
    params = parsed.params.model_dump(exclude_none=True)
    if labels is not None and "response_format" in params:
        raise _bad("params.response_format", "cannot be combined with labels (labels set the response format)")
    webhook_url = check_webhook_url(parsed.webhook_url)
    given = set(parsed.model_fields_set) - {"name", "webhook_url"}
    task_type = parsed.task_type
    if labels is not None and "task_type" not in given:
        task_type = "classification"
    settings = JobSettings(task_type=task_type, tier=parsed.tier, urgent=parsed.urgent, deadline=parsed.deadline,
                           params=params, system=parsed.system, template=parsed.template, labels=labels,
                           metadata=dict(parsed.metadata))
    return JobRequest(parsed.name, settings, frozenset(given), _check_items(items, max_item_bytes), webhook_url)


# --- building task rows --------------------------------------------------------------------------

def label_response_format(labels: Sequence[str]) -> dict[str, Any]:
    """The JSON-schema response format that asks for one of `labels` as `{"label": ...}`."""
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"], "additionalProperties": False}}}


def request_params(settings: JobSettings) -> dict[str, Any]:
    params = dict(settings.params)
    if settings.labels is not None:
        params["response_format"] = label_response_format(settings.labels)
    return params


def system_messages(settings: JobSettings) -> list[dict[str, Any]]:
    return [{"role": "system", "content": settings.system}] if settings.system is not None else []


def render_text(settings: JobSettings, text_value: str) -> str:
    return settings.template.replace(TEXT_PLACEHOLDER, text_value)


def item_messages(settings: JobSettings, item: JobItem) -> list[dict[str, Any]]:
    """The chat messages of one item: the job's system prompt, then the rendered text (or its messages)."""
    if item.messages is not None:
        if settings.system is not None and item.messages and item.messages[0].get("role") == "system":
            return item.messages  # the item brings its own system prompt
        return [*system_messages(settings), *item.messages]
    return [*system_messages(settings), {"role": "user", "content": render_text(settings, item.text or "")}]


class RequestEncoder:
    """Serializes a task's request body fast: the job's JSON with the text spliced in at one slot."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.params = request_params(settings)
        template = json.dumps({"messages": [*system_messages(settings), {"role": "user", "content": _SLOT}],
                               **self.params}, ensure_ascii=False)
        slot = json.dumps(_SLOT, ensure_ascii=False)
        self.prefix, found, self.suffix = template.partition(slot)
        assert found, "the text slot must appear in the serialized request"
        head, _, tail = settings.template.partition(TEXT_PLACEHOLDER)
        self.simple_template = TEXT_PLACEHOLDER not in tail
        self.head, self.tail = head, tail

    def encode(self, item: JobItem) -> str:
        if item.text is not None:
            content = self.head + item.text + self.tail if self.simple_template else render_text(
                self.settings, item.text)
            return self.prefix + json.dumps(content, ensure_ascii=False) + self.suffix
        return json.dumps({"messages": item_messages(self.settings, item), **self.params}, ensure_ascii=False)


def time_ordered_ids(count: int) -> list[uuid.UUID]:
    """UUIDv7-style ids: a millisecond timestamp, then a counter from a random start.

    Tasks of a job sort by id in submission order (results come out in item order), and the
    primary key index takes them at its right edge, which makes COPY faster than random ids.
    """
    milliseconds = time.time_ns() // 1_000_000
    high = ((milliseconds & ((1 << 48) - 1)) << 16) | (0x7 << 12) | secrets.randbits(12)
    start = secrets.randbits(61)  # 62 bits of room below the variant: no wrap for any count we take
    base = (high << 64) | (0b10 << 62)
    return [uuid.UUID(int=base | (start + offset)) for offset in range(count)]


@dataclass(frozen=True, slots=True)
class TierChoice:
    tier: str
    reason: str


def tier_chooser(settings: JobSettings, config: AppConfig, budget_reason: str | None = None,
                 rules: Mapping[str, RuleView] | None = None) -> Callable[[JobItem], TierChoice]:
    """The tier of each item, first that applies: the job's explicit tier → the tenant's
    routing rule for the job's task type (`rules`, from `tenant_rules`, loaded once per request) →
    config `[routing]` → the prompt heuristic. All but the last are the same for every item: resolved
    once. Over a budget with the `downgrade` policy (`budget_reason`), complex items are stored as
    light, saying so."""
    fixed = _fixed_choice(settings, config, rules or {})
    if fixed is not None:
        same = fixed if budget_reason is None else _downgraded(fixed, budget_reason)
        return lambda _item: same

    def per_item(item: JobItem) -> TierChoice:
        decision = resolve_tier(config, settings.tier, settings.task_type, item_messages(settings, item))
        return TierChoice(decision.tier.value, decision.reason)

    if budget_reason is None:
        return per_item
    reason = budget_reason
    return lambda item: _downgraded(per_item(item), reason)


def _downgraded(choice: TierChoice, budget_reason: str) -> TierChoice:
    if choice.tier != Tier.COMPLEX.value:
        return choice
    return TierChoice(Tier.LIGHT.value, f"{budget_reason} (was: {choice.reason})")


def _fixed_choice(settings: JobSettings, config: AppConfig, rules: Mapping[str, RuleView]) -> TierChoice | None:
    """The tier every item of the job gets, or None when the heuristic decides per item."""
    rule = rule_decision(rules, settings.tier, settings.task_type)  # None unless the tier is auto
    if rule is not None:
        return TierChoice(rule.tier.value, rule.reason)
    configured = config.routing.get(settings.task_type)
    if settings.tier is not RequestedTier.AUTO or (configured is not None and configured is not RequestedTier.AUTO):
        decision = resolve_tier(config, settings.tier, settings.task_type, [])
        return TierChoice(decision.tier.value, decision.reason)
    return None


def task_rows(items: Sequence[JobItem], ids: Sequence[uuid.UUID], settings: JobSettings, config: AppConfig,
              tenant_id: uuid.UUID, job_id: uuid.UUID, now: datetime, budget_reason: str | None = None,
              rules: Mapping[str, RuleView] | None = None) -> Iterator[tuple[Any, ...]]:
    """COPY rows in `tierbatch.db.bulk_sql.TASK_COPY_COLUMNS` order."""
    encode = RequestEncoder(settings).encode
    choose = tier_chooser(settings, config, budget_reason, rules)
    metadata = json.dumps(settings.metadata, ensure_ascii=False)
    tenant, job = str(tenant_id), str(job_id)
    requested = settings.tier.value
    for task_id, item in zip(ids, items, strict=True):
        choice = choose(item)
        yield (task_id, item.id, encode(item), choice.tier, choice.reason, tenant, job, settings.task_type,
               requested, settings.urgent, settings.deadline, metadata, _QUEUED, 0, now)


# --- storing -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JobSubmission:
    job: Job
    created: bool
    task_ids: list[str]
    task_count: int  # tasks of the job after this request


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
        select(Task.item_id).where(Task.job_id == job_id,
                                   Task.item_id == any_(bindparam("ids", item_ids, type_=ARRAY(Text))))
        .limit(1))


def copy_task_rows(session: Session, rows: Iterator[tuple[Any, ...]]) -> int:
    """Write rows with one text-format COPY on the session's own connection (same transaction)."""
    raw = session.connection().connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    written = 0
    with raw.cursor() as cursor, cursor.copy(COPY_TASKS) as copy:
        for row in rows:
            copy.write_row(row)
            written += 1
    return written


def _check_not_in_job(session: Session, job: Job, items: Sequence[JobItem], offset: int = 0) -> None:
    item_ids = [item.id for item in items]
    clash = _first_existing_item(session, job.id, item_ids)
    if clash is not None:
        where = f"items[{item_ids.index(clash) + offset}].id"
        raise Conflict(f"{where}: job {job.name or job.id!s} already has an item with id {clash!r}",
                           param=where)


def _copy_items(session: Session, job: Job, settings: JobSettings, items: Sequence[JobItem],
                config: AppConfig, rules: Mapping[str, RuleView]) -> list[uuid.UUID]:
    budget_reason = check_budget(session, job.tenant_id, config)  # 402 under `reject`
    ids = time_ordered_ids(len(items))
    rows = task_rows(items, ids, settings, config, job.tenant_id, job.id, datetime.now(UTC), budget_reason,
                     rules)
    try:
        copy_task_rows(session, rows)
    except psycopg.errors.UniqueViolation as exc:  # the index backs up the check before; the caller rolls back
        raise Conflict(f"items: an item id is already in job {job.name or job.id!s} "
                           f"({exc.diag.message_detail})", param="items") from None
    return ids


def count_tasks(session: Session, job_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).select_from(Task).where(Task.job_id == job_id)) or 0


def submit_job(session: Session, tenant_id: uuid.UUID, request: JobRequest, config: AppConfig) -> JobSubmission:
    """Create the job (or find the tenant's job of that name) and COPY its tasks as `queued`."""
    job, created = _job_for_request(session, tenant_id, request)
    settings = request.settings if created else _settings_for_append(job, request)
    before = 0
    if not created:
        _check_not_in_job(session, job, request.items)
        before = count_tasks(session, job.id)
    rules = tenant_rules(session, tenant_id)  # the tenant's routing rules: one query per request
    ids = _copy_items(session, job, settings, request.items, config, rules)
    return JobSubmission(job, created, [str(i) for i in ids], before + len(ids))


class ItemAppender:
    """Adds items to an existing job chunk by chunk inside the caller's transaction (NDJSON upload).

    Each chunk is checked (also against the items already in the job, including earlier chunks of
    this upload: same transaction) and COPied; only the id range is kept, so memory stays flat.
    """

    def __init__(self, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, config: AppConfig,
                 max_item_bytes: int) -> None:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
                             .with_for_update(key_share=True))
        if job is None:
            raise NotFound(f"no job {job_id}")
        self.session, self.job, self.config, self.max_item_bytes = session, job, config, max_item_bytes
        self.settings = JobSettings.of_job(job)
        self.rules = tenant_rules(session, tenant_id)  # once per upload, not per chunk
        self.added = 0
        self.first_id: uuid.UUID | None = None
        self.last_id: uuid.UUID | None = None

    def add(self, raw_items: list[Any]) -> None:
        items = _check_items(raw_items, self.max_item_bytes, offset=self.added)
        _check_not_in_job(self.session, self.job, items, offset=self.added)
        ids = _copy_items(self.session, self.job, self.settings, items, self.config, self.rules)
        self.first_id = self.first_id or ids[0]
        self.last_id = ids[-1]
        self.added += len(ids)


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


# --- reading -------------------------------------------------------------------------------------

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


def cancel_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> int:
    """queued / waiting_batch → cancelled for every task of the job; returns how many moved."""
    job = get_job(session, tenant_id, job_id)
    return transitions.cancel_unstarted_of_job(session, job.id)


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
