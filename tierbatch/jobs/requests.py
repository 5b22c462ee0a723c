"""A bulk job's request: `POST /v1/jobs` (and each NDJSON chunk of items) parsed and checked; stores nothing.

Speed matters here (the target is ≥ 20,000 tasks/s through `POST /v1/jobs`), so the up to 100,000
items of a request are checked by a tight loop rather than one pydantic model each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tierbatch.base.errors import InvalidInput, InvalidValue, TooLarge
from tierbatch.base.states import RequestedTier
from tierbatch.db.models import Job
from tierbatch.tasks.submission import ChatParams, Deadline, TaskMetadata, check_content_parts, invalid_input_from
from tierbatch.webhooks.targets import check_webhook_url

MAX_ITEMS_PER_REQUEST = 100_000
MAX_ITEM_ID_CHARS = 1000
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
TEXT_PLACEHOLDER = "{text}"
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_ITEM_KEYS = frozenset({"id", "text", "messages"})


class JobFields(BaseModel):
    """Everything of `POST /v1/jobs` but the items (those are checked by `check_items`)."""

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


def check_items(items: list[Any], max_bytes: int, offset: int = 0) -> list[JobItem]:
    """One pass over the items; the common case costs a few dict lookups per item.

    `offset` is the position of `items[0]` in the whole upload, for error messages.
    """
    if offset:
        try:
            return check_items(items, max_bytes)
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
    header = _parse_fields({k: v for k, v in payload.items() if k != "items"}, max_item_bytes)
    return replace(header, items=check_items(items, max_item_bytes))


def parse_job_header(payload: Any, max_item_bytes: int) -> JobRequest:
    """The first line of an NDJSON `POST /v1/jobs`: the job's fields, its items on the lines after it.

    Returns a request without items; raises InvalidInput naming the field. Stores nothing.
    """
    if not isinstance(payload, dict):
        raise InvalidInput("the first line must be a JSON object with the job's fields (name, labels, …); "
                           "the items follow, one per line", param=None)
    if "items" in payload:
        raise _bad("items", "the items of an NDJSON upload go on the lines after the first, one per line")
    if _ITEM_KEYS & payload.keys():
        key = sorted(_ITEM_KEYS & payload.keys())[0]
        raise _bad(key, "the first line holds the job's fields (name, labels, …), not an item; the items "
                        "follow on the next lines (send {} for a job with the defaults)")
    return _parse_fields(payload, max_item_bytes)


def _parse_fields(fields: dict[str, Any], max_item_bytes: int) -> JobRequest:
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
    return JobRequest(parsed.name, settings, frozenset(given), [], webhook_url)
