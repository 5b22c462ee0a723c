"""Chat completion requests and bodies, shared by the immediate route and batch lines.

`validate_chat_request` gives OpenAI's 400 for a bad body; `complete` answers a valid one
(deterministic content, usage with cached tokens) without latency or faults.
"""

from __future__ import annotations

import os
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from tierbatch.providers import openai_validation as shared
from tierbatch.simulator.answers import Answer, Choice, build_answer
from tierbatch.simulator.chat_tools import check_tools, tool_answer
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.errors import OpenAIError
from tierbatch.simulator.tokens import PrefixCache

ROLES = ("system", "assistant", "user", "function", "tool", "developer")  # in the order our 400 lists them
SYSTEM_FINGERPRINT = "fp_sim0001"


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _check_int(body: dict[str, Any], param: str, lo: int, hi: int | None = None) -> None:
    value = body.get(param)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise shared.invalid_type(param, "an integer", value)
    if value < lo:
        raise shared.InvalidRequest(f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, "
                                    f"but got {value} instead.", param, "integer_below_min_value")
    if hi is not None and value > hi:
        raise shared.InvalidRequest(f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, "
                                    f"but got {value} instead.", param, "integer_above_max_value")


def validate_chat_request(body: Any) -> tuple[str, dict[str, Any]]:
    """(model, body) of a valid chat completion request, or OpenAI's 400 naming the parameter.

    The checks shared with the gateway are `tierbatch.providers.openai_validation`'s (its docstring lists where the two
    differ); the simulator adds OpenAI's integer bounds, its temperature message and `prompt_cache_key`."""
    try:
        body = shared.check_request_object(body)
        model = shared.check_model(body, name_missing=False)
        shared.check_messages(body.get("messages"), roles=ROLES)
        _check_int(body, "n", 1, 128)
        _check_int(body, "max_tokens", 1)
        _check_int(body, "max_completion_tokens", 1)
        shared.check_stream(body)
        temperature = body.get("temperature")
        if temperature is not None and (
            not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2
        ):
            raise shared.InvalidRequest("Invalid 'temperature': expected a number between 0 and 2.",
                                        "temperature", "invalid_value")
        shared.check_response_format(body.get("response_format"), typed_json_schema=True)
        cache_key = body.get("prompt_cache_key")
        if cache_key is not None and not isinstance(cache_key, str):
            raise shared.invalid_type("prompt_cache_key", "a string", cache_key)
        check_tools(body)
    except shared.InvalidRequest as refused:
        raise OpenAIError(400, refused.message, "invalid_request_error", refused.param,
                          refused.code) from None
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


def _message_json(choice: Choice) -> str:
    if not choice.tool_calls:
        return (f'{{"role":"assistant","content":{_quote(choice.content)},"refusal":null,'
                f'"annotations":[]}}')
    calls = ",".join(
        f'{{"id":"{call.id}","type":"function","function":{{"name":{_quote(call.name)},'
        f'"arguments":{_quote(call.arguments)}}}}}'
        for call in choice.tool_calls
    )
    return f'{{"role":"assistant","content":null,"refusal":null,"annotations":[],"tool_calls":[{calls}]}}'


def completion_json(answer: Answer, served: str, cached_tokens: int, completion_id: str | None = None,
                    created: int | None = None) -> str:
    """The chat completion body as JSON text, assembled directly (this is the hot path of batches)."""
    choices = ",".join(
        f'{{"index":{i},"message":{_message_json(choice)},"logprobs":null,'
        f'"finish_reason":"{choice.finish_reason}"}}'
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
    answer = tool_answer(body, model, settings) or build_answer(body, model, settings)
    cached = cache.lookup_and_store(model, answer.prompt_text, answer.prompt_tokens)
    return answer, cached
