"""`POST /v1/messages`: Anthropic's Messages API with the chat side's latency and fault injection.

An injected fault takes Anthropic's shape for the model's `error_status`: 429 a rate_limit_error (with
`retry-after`), 503 and 529 an overloaded_error (529), 408 and 504 a timeout_error (504), 400 and 409
an invalid_request_error, 500 and 502 an api_error. `"stream": true` answers with Anthropic's events:
message_start, content_block_start, content_block_delta (text_delta or input_json_delta),
content_block_stop, message_delta (stop_reason, usage), message_stop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tierbatch.simulator.anthropic_errors import AnthropicError, new_request_id, parse_anthropic_json
from tierbatch.simulator.completions import served_model
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.messages_answer import MessageAnswer, answer_message, message_body, new_message_id
from tierbatch.simulator.messages_request import validate_messages_request
from tierbatch.simulator.state import sim_state

_FAULTS: Mapping[int, tuple[str, int, str]] = MappingProxyType({
    400: ("invalid_request_error", 400, "The request was rejected by the simulator (injected fault)."),
    408: ("timeout_error", 504, "Request timed out."),
    409: ("invalid_request_error", 409, "The request conflicted with another request (injected fault)."),
    500: ("api_error", 500, "Internal server error"),
    502: ("api_error", 502, "Bad gateway."),
    503: ("overloaded_error", 529, "Overloaded"),
    504: ("timeout_error", 504, "Request timed out."),
    529: ("overloaded_error", 529, "Overloaded"),
})


def injected_anthropic_fault(settings: ModelSettings) -> AnthropicError:
    status = settings.error_status
    if status == 429:
        wait = settings.retry_after_seconds
        headers = {"retry-after": f"{wait:g}", "anthropic-ratelimit-requests-remaining": "0"}
        return AnthropicError("rate_limit_error", "Number of request tokens has exceeded your per-minute rate "
                              "limit (injected fault).", 429, headers)
    type_, answered, message = _FAULTS[status]
    return AnthropicError(type_, message, answered)


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def _stream(answer: MessageAnswer, served: str) -> AsyncIterator[bytes]:
    start = message_body(answer, served, new_message_id())
    start.update(content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = {**start["usage"], "output_tokens": 1}
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    for index, block in enumerate(answer.content):
        if block["type"] == "tool_use":
            opening = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": piece}
                      for piece in ["", *_pieces(json.dumps(block["input"], separators=(",", ":")), 16)]]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in _pieces(block["text"], 12)]
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": opening})
        for delta in deltas:
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    usage = answer.usage()
    yield _event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
        "usage": {key: usage[key] for key in ("input_tokens", "cache_creation_input_tokens",
                                              "cache_read_input_tokens", "output_tokens")},
    })
    yield _event("message_stop", {"type": "message_stop"})


async def create_message(request: Request) -> Response:
    state = sim_state(request)
    body = parse_anthropic_json(await request.body())
    asked = body.get("model") if isinstance(body, dict) else None
    if isinstance(asked, str) and asked:
        state.stats.messages_calls[asked] += 1
    model, body = validate_messages_request(body)
    settings = state.settings_for(model)
    rng = state.rng
    if settings.error_rate > 0 and rng.random() < settings.error_rate:
        state.stats.messages_errors[model] += 1
        raise injected_anthropic_fault(settings)
    lo, hi = settings.latency_ms
    delay = rng.uniform(lo, hi) / 1000.0 if hi > 0 else 0.0
    if settings.slow_rate > 0 and rng.random() < settings.slow_rate:
        state.stats.messages_slow[model] += 1
        delay = settings.slow_ms / 1000.0
    if delay > 0:
        await asyncio.sleep(delay)
    answer = answer_message(body, model, settings, state.prefix_cache)
    served = served_model(model, settings)
    headers = {"request-id": new_request_id()}
    if body.get("stream"):
        return StreamingResponse(_stream(answer, served), media_type="text/event-stream", headers=headers)
    return JSONResponse(message_body(answer, served), headers=headers)


def messages_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/messages", create_message, methods=["POST"])
    return router
