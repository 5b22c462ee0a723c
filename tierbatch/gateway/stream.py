"""A streamed chat completion: the provider's SSE lines relayed as they arrive, the call recorded when
the stream ends, also when the client leaves midway. Fail closed: the stream holds back its usage chunk
and `[DONE]` until the call's rows are committed, and ends with an error event instead when they are not.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import orjson

from tierbatch.base.errors import ProviderError, RecordingFailed
from tierbatch.base.states import TaskStatus
from tierbatch.gateway.recorder import CallRecord, Recorder, call_costs, compact_json
from tierbatch.gateway.routing import ChatCall, estimate_prompt_tokens
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.providers.adapter import ChatStream, usage_from_body

log = logging.getLogger(__name__)


@dataclass
class _Choice:
    content: list[str] = field(default_factory=list)
    role: str = "assistant"
    finish_reason: str | None = None
    tool_chars: int = 0
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)


class _Relay(enum.Enum):
    SEND = "send"  # to the client now
    HOLD = "hold"  # the end of the answer: to the client once the call is recorded
    DROP = "drop"  # not for the client


def _sse_error(message: str, type_: str, code: str) -> bytes:
    """An error event in OpenAI's stream shape (the SDKs raise it as an APIError)."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + compact_json(body).encode() + b"\n\n"


class StreamSession:
    """Relays the provider's SSE lines as they arrive and records the call when the stream ends.

    `events()` yields bytes for the client; when the provider's stream ends it records the call (exact
    usage from the provider's final chunk, or an estimate flagged as such when the stream stopped early),
    shielded from cancellation so a client that disconnects still leaves its task and ledger row behind.
    Fail closed: the end of the answer (the usage chunk and `[DONE]`) is held back until the task and
    ledger row are committed; if they cannot be, the stream ends with an error event instead. A stream
    the provider broke off ends with an error event too, never with `[DONE]`.
    """

    def __init__(self, recorder: Recorder, prices: PriceBook, tenant_id: uuid.UUID, task_id: uuid.UUID,
                 call: ChatCall, stream: ChatStream, calls: int, started: datetime) -> None:
        self._recorder = recorder
        self._prices = prices
        self.tenant_id = tenant_id
        self.task_id = task_id
        self.call = call
        self.tier = call.route.tier
        self._stream = stream
        self._calls = calls
        self._started = started
        self._clock = time.perf_counter()
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        self._meta: dict[str, Any] = {}
        self._done = False
        self._error: str | None = None
        self._error_relayed = False  # the provider's own error event reached the client
        self._finished: bool | None = None  # None until the call is recorded (or failed to be)

    def _observe(self, payload: str) -> _Relay:
        """Take note of one `data:` payload, and say where it goes."""
        if payload == "[DONE]":
            self._done = True
            return _Relay.HOLD
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            try:  # what orjson refuses and the standard library takes (an escaped unpaired surrogate)
                chunk = json.loads(payload)
            except ValueError:
                return _Relay.SEND
        if not isinstance(chunk, dict):
            return _Relay.SEND
        if "error" in chunk:
            error = chunk.get("error")
            self._error = f"provider error in stream: {error}"
            self._error_relayed = True
            return _Relay.SEND
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None:
                self._meta[key] = chunk[key]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            state = self._choices.setdefault(int(choice.get("index") or 0), _Choice())
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                state.content.append(delta["content"])
            if isinstance(delta.get("role"), str):
                state.role = delta["role"]
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    slot = state.tool_calls.setdefault(int(call.get("index") or 0), {
                        "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                    if call.get("id"):
                        slot["id"] = call["id"]
                    function = call.get("function") or {}
                    slot["function"]["name"] += function.get("name") or ""
                    slot["function"]["arguments"] += function.get("arguments") or ""
                    state.tool_chars += len(function.get("arguments") or "") + len(function.get("name") or "")
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
            if not chunk.get("choices"):
                # we asked for it; the client gets it only if it did too
                return _Relay.HOLD if self.call.include_usage else _Relay.DROP
        return _Relay.SEND

    async def events(self) -> AsyncIterator[bytes]:
        held: list[bytes] = []
        try:
            async for line in self._stream.lines():
                if not line:
                    continue
                if line.startswith("data:"):
                    relay = self._observe(line[5:].strip())
                    if relay is _Relay.SEND:
                        yield line.encode() + b"\n\n"
                    elif relay is _Relay.HOLD:
                        held.append(line.encode() + b"\n\n")
                    if self._done:
                        break  # nothing follows `[DONE]`; do not wait for the provider to close
                else:
                    yield line.encode() + b"\n"
            if not self._done and self._error is None:
                self._error = "the provider's stream ended before the answer was complete"
        except ProviderError as exc:
            self._error = exc.message
        finally:
            with anyio.CancelScope(shield=True):
                recorded = await self._finish()
        # only reached when the stream ran to its end (a client that left closes the generator above)
        if not recorded:
            yield _sse_error(RecordingFailed().message, "server_error", "recording_failed")
        elif self._done and self._error is None:
            for event in held:
                yield event
        elif not self._error_relayed:
            yield _sse_error(self._error or "The provider's stream ended before the answer was complete.",
                             "server_error", "upstream_stream_broken")

    async def _finish(self) -> bool:
        """Close the provider stream and record the call, once; whether its rows are committed."""
        if self._finished is not None:
            return self._finished
        self._finished = False
        try:
            await self._stream.aclose()
        except Exception:  # the connection may already be gone
            log.debug("closing the provider stream failed", exc_info=True)
        try:
            await self._recorder.record(self._record())
        except RecordingFailed:
            log.error("stream %s: the call could not be recorded; its end is withheld", self.task_id)
            return False
        except Exception:
            log.exception("stream %s: the call could not be recorded; its end is withheld", self.task_id)
            return False
        self._finished = True
        return True

    def _output(self) -> str:
        first = self._choices.get(0)
        return "".join(first.content) if first else ""

    def _body(self, usage: TokenUsage | None) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {"role": state.role, "content": "".join(state.content) or None}
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
            choices.append({"index": index, "message": message, "finish_reason": state.finish_reason})
        body: dict[str, Any] = {"id": self._meta.get("id"), "object": "chat.completion",
                                "created": self._meta.get("created"), "model": self.served_model,
                                "choices": choices}
        if self._usage is not None:
            body["usage"] = self._usage
        return body

    @property
    def served_model(self) -> str:
        return str(self._meta.get("model") or self._stream.requested_model)

    def _estimate(self) -> TokenUsage:
        output_chars = sum(len("".join(c.content)) + c.tool_chars for c in self._choices.values())
        return TokenUsage(estimate_prompt_tokens(self.call.request.get("messages") or []), 0,
                          math.ceil(output_chars / 4))

    def _record(self) -> CallRecord:
        complete = self._done and self._error is None
        if self._usage is not None:
            usage, estimated = usage_from_body({"usage": self._usage}), False
        else:
            usage, estimated = self._estimate(), True
        error = self._error
        if not complete and error is None:
            error = "the client closed the stream before its end" if not self._done else None
        provider, requested = self._stream.provider, self._stream.requested_model
        priced, cost, baseline = call_costs(self._prices, provider, self.served_model, requested, usage)
        return CallRecord(
            self.task_id, self.tenant_id, self.call.route, self.call.request, self.call.metadata,
            TaskStatus.SUCCEEDED if complete else TaskStatus.FAILED, self._calls, self.call.received_at, self._started,
            provider=provider, requested_model=requested, served_model=self.served_model, output=self._output(),
            response_json=compact_json(self._body(usage)), usage=usage, usage_estimated=estimated,
            latency_ms=int((time.perf_counter() - self._clock) * 1000), error=error, prices=priced,
            cost_usd=cost, baseline_cost_usd=baseline)
