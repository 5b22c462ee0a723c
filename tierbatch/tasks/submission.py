"""What a producer submits: validated the same way by the API and by the Celery
`tierbatch.submit_tasks` path, before anything is stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierbatch.base.errors import InvalidInput, InvalidValue, TooLarge
from tierbatch.base.states import RequestedTier
from tierbatch.cache.responses import check_cache_switch


class ChatParams(BaseModel):
    """The chat parameters a task may carry; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    # function tools, as OpenAI's chat completions take them; a tool call comes back in the task's
    # `response` (its `output` is the message's text, empty for a call), and the next task carries the
    # assistant's `tool_calls` and the `tool` message with the result
    tools: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def _deadline_has_timezone(value: datetime | None) -> datetime | None:
    """The deadline in UTC: RFC 3339 allows offsets up to ±23:59, Postgres stores only up to ±15:59."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("deadline must be RFC 3339 with a timezone offset")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is past the last representable instant
        raise ValueError("deadline is out of range") from None


def _cache_switch_known(value: dict[str, str]) -> dict[str, str]:
    check_cache_switch(value)
    return value


# Fields shared by single tasks and bulk jobs, with their checks
Deadline = Annotated[datetime | None, AfterValidator(_deadline_has_timezone)]
TaskMetadata = Annotated[dict[str, str], AfterValidator(_cache_switch_known)]


def check_content_parts(parts: list[Any]) -> tuple[str, str] | None:
    """What is wrong with a message's content parts (each an object; a `text` is a string), as (where, what):
    `("[1].text", "must be a string")`; None when nothing is."""
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            return f"[{index}]", "must be an object such as {\"type\": \"text\", \"text\": \"...\"}"
        if "text" in part and not isinstance(part["text"], str):
            return f"[{index}].text", "must be a string"
    return None


def _content_parts_checked(value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
    problem = check_content_parts(value) if isinstance(value, list) else None
    if problem is not None:
        raise ValueError(f"content{problem[0]} {problem[1]}")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[dict[str, Any]] | None, AfterValidator(_content_parts_checked)] = None


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    task_type: Annotated[str, Field(min_length=1, max_length=100)] = "general"
    tier: RequestedTier = RequestedTier.AUTO
    urgent: bool = False
    deadline: Deadline = None
    params: ChatParams = Field(default_factory=ChatParams)
    metadata: TaskMetadata = Field(default_factory=dict)
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @model_validator(mode="after")
    def _one_of_messages_or_prompt(self) -> TaskSpec:
        if self.messages is None and self.prompt is None:
            raise ValueError("one of 'messages' or 'prompt' is required")
        if self.messages is not None and self.prompt is not None:
            raise ValueError("give either 'messages' or 'prompt', not both")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [m.model_dump(exclude_none=True) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]

    def provider_request(self) -> dict[str, Any]:
        """The chat request body, minus `model` (chosen at call time)."""
        return {"messages": self.chat_messages(), **self.params.model_dump(exclude_none=True)}


class TaskBatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSpec] = Field(min_length=1)


def _param_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def invalid_input_from(error: ValidationError, prefix: tuple[int | str, ...] = ()) -> InvalidInput:
    """The first validation error as an InvalidInput naming the field."""
    first = error.errors()[0]
    loc = prefix + tuple(first["loc"])
    # pydantic tags union members into the location; drop those tags for a user-facing path
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p.startswith("function-") or p in {
        "str", "list[dict[str,any]]", "list[str]"})))
    param = _param_of(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    kind = InvalidInput if first["type"] == "json_invalid" else InvalidValue
    return kind(f"{param}: {message}" if param else message, param=param)


def parse_submission(payload: Any, max_tasks: int, max_prompt_bytes: int) -> list[TaskSpec]:
    """One task or `{"tasks": [...]}` → validated specs; raises InvalidInput naming the field."""
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object: one task or {\"tasks\": [...]}", param=None)
    try:
        if "tasks" in payload:
            tasks = payload.get("tasks")
            if isinstance(tasks, list) and len(tasks) > max_tasks:
                raise TooLarge(f"tasks: at most {max_tasks} tasks per request (got {len(tasks)})",
                                   param="tasks")
            specs = TaskBatchSpec.model_validate(payload).tasks
            prefix: tuple[int | str, ...] = ("tasks",)
        else:
            specs = [TaskSpec.model_validate(payload)]
            prefix = ()
    except ValidationError as exc:
        raise invalid_input_from(exc) from None
    for index, spec in enumerate(specs):
        size = len(json.dumps(spec.chat_messages(), ensure_ascii=False).encode())
        if size > max_prompt_bytes:
            field = "messages" if spec.messages is not None else "prompt"
            where = _param_of((*prefix, index, field)) if prefix else field
            raise TooLarge(f"{where}: {size} bytes is over the limit of {max_prompt_bytes} bytes",
                               param=where)
    return specs
