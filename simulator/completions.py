"""Chat completion requests and bodies, shared by the immediate route and batch lines.

`validate_chat_request` gives OpenAI's 400 for a bad body; `complete` answers a valid one
(deterministic content, usage with cached tokens) without latency or faults.
"""

from __future__ import annotations

import os
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from simulator.answers import Answer, build_answer
from simulator.config import ModelSettings
from simulator.errors import OpenAIError
from simulator.tokens import PrefixCache

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_CONTENT_REQUIRED = ("system", "user", "developer", "tool")
_FORMATS = ("text", "json_object", "json_schema")
SYSTEM_FINGERPRINT = "fp_sim0001"


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid_type(param: str, expected: str, value: Any) -> OpenAIError:
    return OpenAIError(400, f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} "
                       "instead.", "invalid_request_error", param, "invalid_type")


def _missing(param: str) -> OpenAIError:
    return OpenAIError(400, f"Missing required parameter: '{param}'.", "invalid_request_error", param,
                       "missing_required_parameter")


def _check_int(body: dict[str, Any], param: str, lo: int, hi: int | None = None) -> None:
    value = body.get(param)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid_type(param, "an integer", value)
    if value < lo:
        raise OpenAIError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, "
                          f"but got {value} instead.", "invalid_request_error", param,
                          "integer_below_min_value")
    if hi is not None and value > hi:
        raise OpenAIError(400, f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, "
                          f"but got {value} instead.", "invalid_request_error", param,
                          "integer_above_max_value")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise OpenAIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                          "but got an empty array instead.", "invalid_request_error", "messages",
                          "empty_array")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if role not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES)
            raise OpenAIError(400, f"Invalid value: '{role}'. Supported values are: {supported}.",
                              "invalid_request_error", f"{where}.role", "invalid_value")
        content = message.get("content")
        if role in _CONTENT_REQUIRED and content is None:
            raise _missing(f"{where}.content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid_type(f"{where}.content", "one of a string or array of objects", content)


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _invalid_type("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind is None:
        raise _missing("response_format.type")
    if kind not in _FORMATS:
        raise OpenAIError(400, f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and "
                          "'json_schema'.", "invalid_request_error", "response_format.type", "invalid_value")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if spec is None:
            raise _missing("response_format.json_schema")
        if not isinstance(spec, dict):
            raise _invalid_type("response_format.json_schema", "an object", spec)
        if not isinstance(spec.get("name"), str):
            raise _missing("response_format.json_schema.name")
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise _invalid_type("response_format.json_schema.schema", "an object", spec["schema"])


def validate_chat_request(body: Any) -> tuple[str, dict[str, Any]]:
    """(model, body) of a valid chat completion request, or OpenAI's 400 naming the parameter."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "Invalid type for request body: expected an object, but got "
                          f"{_type_name(body)} instead.", "invalid_request_error", None, "invalid_type")
    model = body.get("model")
    if model is None or model == "":
        raise OpenAIError(400, "you must provide a model parameter", "invalid_request_error", None, None)
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    _check_messages(body.get("messages"))
    _check_int(body, "n", 1, 128)
    _check_int(body, "max_tokens", 1)
    _check_int(body, "max_completion_tokens", 1)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2
    ):
        raise OpenAIError(400, "Invalid 'temperature': expected a number between 0 and 2.",
                          "invalid_request_error", "temperature", "invalid_value")
    _check_response_format(body.get("response_format"))
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None and not isinstance(cache_key, str):
        raise _invalid_type("prompt_cache_key", "a string", cache_key)
    return model, body


def usage_body(answer: Answer, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": answer.reasoning_tokens, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


def served_model(model: str, settings: ModelSettings) -> str:
    return settings.served_as or model


def completion_json(answer: Answer, served: str, cached_tokens: int, completion_id: str | None = None,
                    created: int | None = None) -> str:
    """The chat completion body as JSON text, assembled directly (this is the hot path of batches)."""
    choices = ",".join(
        f'{{"index":{i},"message":{{"role":"assistant","content":{_quote(choice.content)},"refusal":null,'
        f'"annotations":[]}},"logprobs":null,"finish_reason":"{choice.finish_reason}"}}'
        for i, choice in enumerate(answer.choices)
    )
    prompt, completion = answer.prompt_tokens, answer.completion_tokens
    usage = (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{prompt + completion},'
        f'"prompt_tokens_details":{{"cached_tokens":{cached_tokens},"audio_tokens":0}},'
        f'"completion_tokens_details":{{"reasoning_tokens":{answer.reasoning_tokens},"audio_tokens":0,'
        f'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}'
    )
    return (
        f'{{"id":"{completion_id or new_id("chatcmpl-")}","object":"chat.completion",'
        f'"created":{created if created is not None else int(time.time())},"model":{_quote(served)},'
        f'"choices":[{choices}],"usage":{usage},"service_tier":"default",'
        f'"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}'
    )


def complete(body: dict[str, Any], model: str, settings: ModelSettings,
             cache: PrefixCache) -> tuple[Answer, int]:
    """The answer to a valid request and its cached prompt tokens (remembering the prompt's prefixes)."""
    answer = build_answer(body, model, settings)
    cached = cache.lookup_and_store(model, answer.prompt_text, answer.prompt_tokens)
    return answer, cached
