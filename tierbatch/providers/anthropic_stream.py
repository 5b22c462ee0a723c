"""An Anthropic Messages stream as OpenAI chat completion chunks, event by event.

Each Anthropic event becomes at once the chunk lines it stands for, nothing is held back: `message_start`
→ a role chunk, text deltas → `delta.content`, `tool_use` blocks and their `input_json_delta`s →
`delta.tool_calls` (the forced tool of a `json_schema` response format → `delta.content`, as JSON text),
`message_delta` → a chunk with the `finish_reason`, `message_stop` → a usage chunk with `choices: []`
(the usage of `tierbatch.providers.anthropic_messages.chat_usage`) then `data: [DONE]`; an `error` event →
an OpenAI error event (`data: {"error": ...}`), which the gateway relays and records.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2

from tierbatch.base.errors import RetryableProviderError
from tierbatch.providers.anthropic_messages import chat_usage, finish_reason

DONE_LINE = "data: [DONE]"


def _line(body: Mapping[str, Any]) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class StreamTranslator:
    """Feeds on Anthropic's stream events (parsed `data:` payloads); returns OpenAI chunk SSE lines."""

    def __init__(self, response_tool: str | None = None, created: int | None = None) -> None:
        self._response_tool = response_tool
        self._created = int(time.time()) if created is None else created
        self._id: str | None = None
        self._model: str | None = None
        self._usage: dict[str, Any] = {}
        self._tool_calls: dict[int, int] = {}  # Anthropic block index → OpenAI tool call index
        self._answer_blocks: set[int] = set()  # blocks of the forced response tool

    def _chunk(self, delta: dict[str, Any], reason: str | None = None) -> str:
        return _line({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                      "model": self._model,
                      "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})

    def _usage_update(self, usage: Any) -> None:
        if isinstance(usage, Mapping):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def feed(self, event: Mapping[str, Any]) -> list[str]:
        kind = event.get("type")
        index = int(event.get("index") or 0)
        if kind == "message_start":
            message = event.get("message") or {}
            self._id, self._model = message.get("id"), message.get("model")
            self._usage_update(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                if self._response_tool is not None and block.get("name") == self._response_tool:
                    self._answer_blocks.add(index)
                    return []
                position = self._tool_calls[index] = len(self._tool_calls)
                return [self._chunk({"tool_calls": [{"index": position, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text") or ""})]
            if delta.get("type") == "input_json_delta":
                partial = delta.get("partial_json") or ""
                if index in self._answer_blocks:
                    return [self._chunk({"content": partial})] if partial else []
                if index in self._tool_calls:
                    return [self._chunk({"tool_calls": [{"index": self._tool_calls[index],
                                                         "function": {"arguments": partial}}]})]
            return []
        if kind == "message_delta":
            self._usage_update(event.get("usage"))
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            reason = finish_reason(stop_reason, None if self._tool_calls else self._response_tool)
            return [self._chunk({}, reason)] if reason is not None else []
        if kind == "message_stop":
            usage_chunk: dict[str, Any] = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                           "model": self._model, "choices": [], "usage": chat_usage(self._usage)}
            return [_line(usage_chunk), DONE_LINE]
        if kind == "error":
            error = event.get("error") or {}
            return [_line({"error": {"message": str(error.get("message") or "provider error"),
                                     "type": str(error.get("type") or "api_error"), "param": None, "code": None}})]
        return []  # ping, and events that have no chunk


class AnthropicChatStream:
    """An open Messages stream (status 200 already received), its events relayed as OpenAI chunk lines
    as they arrive."""

    def __init__(self, provider: str, model: str, response: httpx2.Response, response_tool: str | None) -> None:
        self.provider = provider
        self.requested_model = model
        self._response = response
        self._translator = StreamTranslator(response_tool)

    async def lines(self) -> AsyncIterator[str]:
        """The translated lines; a broken connection raises ProviderError."""
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # `event:` names repeat the payload's `type`
                try:
                    event = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(event, dict):
                    for translated in self._translator.feed(event):
                        yield translated
        except httpx2.HTTPError as exc:
            raise RetryableProviderError(f"{self.provider}/{self.requested_model}: stream broken: "
                                         f"{type(exc).__name__}: {exc}", provider=self.provider,
                                         model=self.requested_model) from exc

    async def aclose(self) -> None:
        await self._response.aclose()
