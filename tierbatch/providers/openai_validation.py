"""OpenAI's own checks of a chat completion request, shared by the gateway (`tierbatch.gateway.validation`) and the
provider simulator (`tierbatch.simulator.completions`).

Pure and standard-library only: the simulator imports it, and must not pull in settings, the database
or the provider client through it. A failed check raises `InvalidRequest` (message, param, code);
each side turns it into its own error class at its boundary (the gateway's `InvalidInput`, the
simulator's `OpenAIError`), always a 400 with type `invalid_request_error`.

Each side composes these checks in its own order and keeps what only it checks. Where the two
surfaces differ today, the difference is kept, by a parameter here or in the caller:

- missing `model`: the gateway names it (param `model`, code `missing_required_parameter`); the
  simulator answers like OpenAI, with neither (`check_model(name_missing=...)`).
- the role list in "Supported values are: ..." is in a different order on each side (`roles=`).
- `response_format.json_schema`: the gateway reports anything but an object as missing; the simulator
  reports a non-object as `invalid_type` and also type-checks `json_schema.schema`
  (`check_response_format(typed_json_schema=...)`).
- numbers: the gateway checks n, max_tokens, max_completion_tokens, seed, top_logprobs, temperature,
  top_p and the penalties with one range message (code `invalid_value`, `invalid_type` for a
  non-number); the simulator checks n and the token limits with OpenAI's integer messages
  (`integer_below_min_value` / `integer_above_max_value`) and answers any bad temperature, of any
  type, with `invalid_value`. Those checks stay with each caller.
- only the gateway refuses streaming for batch lines and `stream_options` without `stream`, and
  checks `stop`, `tools` and `metadata`; only the simulator checks `prompt_cache_key`.
- which fields are accepted at all is the gateway's own list (`tierbatch.gateway.fields`, not OpenAI's: it
  refuses fields OpenAI takes but the ledger cannot price); the simulator takes any field, like the
  provider it stands for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})  # roles whose `content` may not be null


class InvalidRequest(Exception):
    """A request OpenAI would refuse (always with a 400): its error's message, param and code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def type_name(value: Any) -> str:
    """How OpenAI names a JSON value's type in its messages ("a string", "an array", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def invalid_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {type_name(value)} instead.",
                          param, "invalid_type")


def missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def check_request_object(body: Any) -> dict[str, Any]:
    """The body, if it is a JSON object."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"Invalid type for request body: expected an object, but got {type_name(body)} "
                             "instead.", None, "invalid_type")
    return body


def check_model(body: dict[str, Any], *, name_missing: bool) -> str:
    """The request's model; `name_missing` gives a missing one param `model` and a code (OpenAI gives none)."""
    model = body.get("model")
    if model is None or model == "":
        if name_missing:
            raise InvalidRequest("you must provide a model parameter", "model", "missing_required_parameter")
        raise InvalidRequest("you must provide a model parameter")
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    return model


def check_messages(messages: Any, *, roles: Sequence[str]) -> None:
    """A non-empty array of message objects, each with a known role (listed in the order of `roles`)."""
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                             "empty array instead.", "messages", "empty_array")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise missing(f"{where}.role")
        if role not in roles:
            supported = ", ".join(f"'{r}'" for r in roles)
            raise InvalidRequest(f"Invalid value: '{role}'. Supported values are: {supported}.", f"{where}.role",
                                 "invalid_value")
        content = message.get("content")
        if role in CONTENT_REQUIRED and content is None:
            raise missing(f"{where}.content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_type(f"{where}.content", "one of a string or array of objects", content)


def check_stream(body: dict[str, Any]) -> bool:
    """Whether the request streams (`stream` absent or a boolean)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_type("stream", "a boolean", stream)
    return bool(stream)


def check_response_format(value: Any, *, typed_json_schema: bool) -> None:
    """`response_format`: absent, or an object of a known type, a `json_schema` one with a named schema.

    `typed_json_schema`: a `json_schema` that is there but not an object is `invalid_type` (not missing),
    and `json_schema.schema`, when given, must be an object."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise invalid_type("response_format", "an object", value)
    kind = value.get("type")
    if kind is None:
        raise missing("response_format.type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and "
                             "'json_schema'.", "response_format.type", "invalid_value")
    if kind != "json_schema":
        return
    spec = value.get("json_schema")
    if typed_json_schema and spec is not None and not isinstance(spec, dict):
        raise invalid_type("response_format.json_schema", "an object", spec)
    if not isinstance(spec, dict):
        raise missing("response_format.json_schema")
    if not isinstance(spec.get("name"), str):
        raise missing("response_format.json_schema.name")
    if typed_json_schema and "schema" in spec and not isinstance(spec["schema"], dict):
        raise invalid_type("response_format.json_schema.schema", "an object", spec["schema"])


def check_batch_metadata(metadata: Any, *, ellipsis: str = "…") -> dict[str, str] | None:
    """`metadata` of `POST /v1/batches`: at most 16 string values, keys up to 64 and values up to 512
    characters. `ellipsis` ends a long key quoted in the message (the simulator writes "...")."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("Invalid type for 'metadata': expected an object.", "metadata", "invalid_type")
    if len(metadata) > 16:
        raise InvalidRequest("Invalid 'metadata': too many properties. Expected at most 16 properties.", "metadata",
                             "object_above_max_properties")
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequest(f"Invalid 'metadata': key '{key[:20]}{ellipsis}' is longer than 64 characters.",
                                 "metadata", "invalid_value")
        if not isinstance(value, str):
            raise InvalidRequest(f"Invalid type for 'metadata.{key}': expected a string.", f"metadata.{key}",
                                 "invalid_type")
        if len(value) > 512:
            raise InvalidRequest(f"Invalid 'metadata.{key}': string too long. Expected at most 512 characters.",
                                 f"metadata.{key}", "string_above_max_length")
    return dict(metadata)
