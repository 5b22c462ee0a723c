"""`POST /v1/chat/completions`: latency, fault injection, and the JSON or SSE answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from tierbatch.simulator.answers import Answer
from tierbatch.simulator.completions import (
    SYSTEM_FINGERPRINT,
    complete,
    completion_json,
    new_id,
    served_model,
    usage_body,
    validate_chat_request,
)
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.errors import OpenAIError, parse_json_body
from tierbatch.simulator.state import sim_state

_FAULTS: Mapping[int, tuple[str, str, str | None]] = MappingProxyType({
    400: ("The request was rejected by the simulator (injected fault).", "invalid_request_error", None),
    408: ("Request timed out.", "timeout_error", None),
    409: ("The request conflicted with another request (injected fault).", "invalid_request_error", None),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
})


def injected_fault(model: str, settings: ModelSettings) -> OpenAIError:
    status = settings.error_status
    if status == 429:
        wait = settings.retry_after_seconds
        headers = {
            "retry-after": f"{wait:g}",
            "retry-after-ms": str(round(wait * 1000)),
            "x-ratelimit-remaining-requests": "0",
        }
        message = (f"Rate limit reached for {model} in organization org-simulator on requests per min (RPM): "
                   f"Limit 500, Used 500, Requested 1. Please try again in {wait:g}s.")
        return OpenAIError(429, message, "requests", None, "rate_limit_exceeded", headers)
    if status == 529:  # Anthropic's overloaded_error: OpenAI's overloaded answer is a 503
        status = 503
    message, type_, code = _FAULTS[status]
    return OpenAIError(status, message, type_, None, code)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _pieces(text: str, words_per_piece: int = 3) -> list[str]:
    words = text.split(" ")
    return [
        " ".join(words[i:i + words_per_piece]) + (" " if i + words_per_piece < len(words) else "")
        for i in range(0, len(words), words_per_piece)
    ]


def _json_pieces(text: str, size: int = 16) -> list[str]:
    """Arguments JSON in the fragments a stream sends them in (concatenated, the whole text)."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


async def _stream(answer: Answer, served: str, cached: int, include_usage: bool,
                  completion_id: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    base: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served,
        "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    for index, choice in enumerate(answer.choices):
        if choice.tool_calls:
            for position, call in enumerate(choice.tool_calls):
                head = {"index": position, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}
                yield chunk(index, {"role": "assistant", "content": None, "refusal": None, "tool_calls": [head]}
                            if position == 0 else {"tool_calls": [head]})
                for piece in _json_pieces(call.arguments):
                    yield chunk(index, {"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
            yield chunk(index, {}, choice.finish_reason)
            continue
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
        for piece in _pieces(choice.content):
            yield chunk(index, {"content": piece})
        yield chunk(index, {}, choice.finish_reason)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage_body(answer, cached)})
    yield b"data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    state = sim_state(request)
    body = parse_json_body(await request.body())
    asked = body.get("model") if isinstance(body, dict) else None
    if isinstance(asked, str) and asked:
        state.stats.chat_calls[asked] += 1
    model, body = validate_chat_request(body)
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None:
        state.stats.prompt_cache_keys[cache_key] += 1
    settings = state.settings_for(model)
    rng = state.rng
    if settings.error_rate > 0 and rng.random() < settings.error_rate:
        state.stats.chat_errors[model] += 1
        raise injected_fault(model, settings)
    lo, hi = settings.latency_ms
    delay = rng.uniform(lo, hi) / 1000.0 if hi > 0 else 0.0
    if settings.slow_rate > 0 and rng.random() < settings.slow_rate:
        state.stats.chat_slow[model] += 1
        delay = settings.slow_ms / 1000.0
    if delay > 0:
        await asyncio.sleep(delay)
    answer, cached = complete(body, model, settings, state.prefix_cache)
    served = served_model(model, settings)
    completion_id = new_id("chatcmpl-")
    state.stats.record_answer(model, completion_id, answer.family, answer.reference, state.config.record_verdicts)
    headers = {"x-request-id": new_id("req_")}
    if body.get("stream"):
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(_stream(answer, served, cached, include_usage, completion_id),
                                 media_type="text/event-stream", headers=headers)
    return Response(completion_json(answer, served, cached, completion_id), media_type="application/json",
                    headers=headers)


def chat_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return router
