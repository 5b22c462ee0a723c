"""The gateway's checks of a chat completion request, before any provider call: first the fields
(`tierbatch.gateway.fields`: only what the ledger can price is forwarded) and characters (nothing Postgres
could not record), then OpenAI's own checks, with its messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tierbatch.base.errors import InvalidInput
from tierbatch.gateway import fields as chat_fields
from tierbatch.providers import openai_validation as shared

ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # in the order our 400 lists them


def refusal(refused: shared.InvalidRequest) -> InvalidInput:
    """A refusal of the shared checks (`tierbatch.providers.openai_validation`) as the gateway's 400."""
    return InvalidInput(refused.message, refused.param, refused.code)


def _check_number(body: Mapping[str, Any], param: str, lo: float, hi: float | None, integer: bool) -> None:
    value = body.get(param)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise shared.invalid_type(param, "an integer" if integer else "a number", value)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f">= {lo:g}"
        raise shared.InvalidRequest(f"Invalid '{param}': expected a value {bound}, but got {value} instead.",
                                    param, "invalid_value")


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise shared.invalid_type("metadata", "an object", value)
    if len(value) > 16:
        raise shared.InvalidRequest("Invalid 'metadata': too many properties. Expected an object with at most 16 "
                                    f"properties, but got an object with {len(value)} properties instead.",
                                    "metadata", "object_above_max_properties")
    for key, item in value.items():
        if len(key) > 64:
            raise shared.InvalidRequest(f"Invalid 'metadata': key '{key[:20]}…' is longer than 64 characters.",
                                        "metadata", "invalid_value")
        if not isinstance(item, str):
            raise shared.invalid_type(f"metadata.{key}", "a string", item)
        if len(item) > 512:
            raise shared.InvalidRequest(f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                                        f"length 512, but got a string with length {len(item)} instead.",
                                        f"metadata.{key}", "string_above_max_length")
    switch = value.get("cache")  # ours: the response cache switch
    if switch is not None and switch not in ("on", "off"):
        raise shared.InvalidRequest(f"Invalid value for 'metadata.cache': '{switch}'. Supported values are: 'on' and "
                                    "'off'.", "metadata.cache", "invalid_value")
    return dict(value)


def check_metadata(value: Any) -> dict[str, str]:
    """`metadata` as a dict (empty when absent), or the gateway's 400."""
    try:
        return _metadata(value)
    except shared.InvalidRequest as refused:
        raise refusal(refused) from None


def validate_chat_body(body: Any, *, allow_stream: bool = True) -> dict[str, Any]:
    """OpenAI's checks of a chat completion request, with its messages; returns the body.

    First what can be recorded and which fields are accepted (`tierbatch.gateway.fields`: its docstring is the
    list), so no later message quotes a character that cannot be stored. The checks shared with the
    simulator are `tierbatch.providers.openai_validation`'s (its docstring lists where the two differ); the gateway adds
    `stream_options`, the number ranges, `stop`, `tools` and `metadata`, and refuses streaming for batch
    lines (`allow_stream=False`)."""
    try:
        body = shared.check_request_object(body)
        chat_fields.check_storable(body)
        chat_fields.check_fields(body)
        shared.check_model(body, name_missing=True)
        shared.check_messages(body.get("messages"), roles=ROLES)
        stream = shared.check_stream(body)
        if stream and not allow_stream:
            raise shared.InvalidRequest("Streaming is not supported for batch requests.", "stream", "invalid_value")
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise shared.invalid_type("stream_options", "an object", options)
            if not stream:
                raise shared.InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is "
                                            "enabled.", "stream_options", "invalid_value")
        _check_number(body, "n", 1, 128, integer=True)
        _check_number(body, "max_tokens", 1, None, integer=True)
        _check_number(body, "max_completion_tokens", 1, None, integer=True)
        _check_number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
        _check_number(body, "top_logprobs", 0, 20, integer=True)
        _check_number(body, "temperature", 0, 2, integer=False)
        _check_number(body, "top_p", 0, 1, integer=False)
        _check_number(body, "presence_penalty", -2, 2, integer=False)
        _check_number(body, "frequency_penalty", -2, 2, integer=False)
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
            raise shared.InvalidRequest("Invalid 'stop': expected a string or an array of at most 4 strings.",
                                        "stop", "invalid_value")
        shared.check_response_format(body.get("response_format"), typed_json_schema=False)
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise shared.invalid_type("tools", "an array", tools)
            for index, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise shared.invalid_type(f"tools[{index}]", "an object", tool)
                if not isinstance(tool.get("type"), str):
                    raise shared.missing(f"tools[{index}].type")
        _metadata(body.get("metadata"))
    except shared.InvalidRequest as refused:
        raise refusal(refused) from None
    return body
