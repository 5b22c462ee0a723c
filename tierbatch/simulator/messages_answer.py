"""The answer to a valid Messages request, shared by `POST /v1/messages` and message batches.

Text comes from `answers.build_answer` over `messages_request.chat_view` (so a prompt listing labels gets
a label, with the chat side's agreement); a required tool gets a `tool_use` block whose input comes from
`tool_arguments`. Usage splits the prompt like Anthropic: `input_tokens` (not cached),
`cache_read_input_tokens` and `cache_creation_input_tokens` from the shared prefix cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tierbatch.simulator.answers import build_answer, input_key
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.messages_request import breakpoints, chat_view, offered_tools, required_tool_name
from tierbatch.simulator.tokens import PrefixCache, count_tokens
from tierbatch.simulator.tool_arguments import arguments_json, pick_tool, tool_arguments, tool_call_id

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


@dataclass(frozen=True)
class MessageAnswer:
    content: list[dict[str, Any]]  # text or tool_use blocks
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int  # the uncached part of the prompt
    cache_read: int
    cache_write: int
    output_tokens: int

    def usage(self, service_tier: str = "standard") -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write, "ephemeral_1h_input_tokens": 0},
            "output_tokens": self.output_tokens,
            "service_tier": service_tier,
        }


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def _cut_at_stop(text: str, stops: Any) -> tuple[str, str | None]:
    if not isinstance(stops, list):
        return text, None
    found: tuple[int, str] | None = None
    for stop in stops:
        if isinstance(stop, str) and stop:
            at = text.find(stop)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
    return (text, None) if found is None else (text[:found[0]], found[1])


def answer_message(body: dict[str, Any], model: str, settings: ModelSettings, cache: PrefixCache) -> MessageAnswer:
    """The answer to a valid Messages request (no latency, no faults), remembering its prefixes."""
    view = chat_view(body)
    answer = build_answer(view, model, settings)
    read, written = cache.read_and_write(model, answer.prompt_text, answer.prompt_tokens, breakpoints(body))
    uncached = max(0, answer.prompt_tokens - read - written)
    wanted = required_tool_name(body)
    tools = offered_tools(body)
    if wanted is not None and tools:
        key = input_key(view["messages"])
        tool = next((t for t in tools if t.name == wanted), None) if wanted else pick_tool(tools, key)
        if tool is not None:
            arguments = tool_arguments(tool, key, model, settings)
            block = {"type": "tool_use", "id": tool_call_id("toolu_", key, tool.name), "name": tool.name,
                     "input": arguments}
            output = count_tokens(tool.name) + count_tokens(arguments_json(arguments))
            return MessageAnswer([block], "tool_use", None, uncached, read, written, output)
    choice = answer.choices[0]
    text, stop = _cut_at_stop(choice.content, body.get("stop_sequences"))
    reason = "stop_sequence" if stop is not None else STOP_REASONS.get(choice.finish_reason, "end_turn")
    return MessageAnswer([{"type": "text", "text": text}], reason, stop, uncached, read, written,
                         max(1, count_tokens(text)))


def message_body(answer: MessageAnswer, served: str, message_id: str | None = None,
                 service_tier: str = "standard") -> dict[str, Any]:
    return {
        "id": message_id or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": served,
        "content": answer.content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": answer.stop_sequence,
        "usage": answer.usage(service_tier),
    }
