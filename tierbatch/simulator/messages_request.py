"""Anthropic Messages requests: Anthropic's 400s for a bad body, and the request as the answer logic sees it.

`validate_messages_request` checks what the Messages API checks before answering (`model`, `max_tokens`,
`messages` alternating user/assistant with string or block content, `system`, `tools`, `tool_choice`,
`stream`, `temperature`, `stop_sequences`). `chat_view` rewrites a valid request as the chat-shaped body
`answers.build_answer` reads (the system prompt first, `cache_control` marks dropped), so the same prompt
gets the same answer, and the same label, on both sides. `breakpoints` finds where marked blocks end in
the prompt text, for the prefix cache.
"""

from __future__ import annotations

from typing import Any

from tierbatch.simulator.anthropic_errors import AnthropicError, invalid_request
from tierbatch.simulator.tokens import content_text
from tierbatch.simulator.tool_arguments import ToolSpec, offered_schema

BLOCK_TYPES = ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
               "search_result")
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")


def _check_block(block: Any, where: str) -> None:
    if not isinstance(block, dict):
        raise invalid_request(f"{where}: Input should be a valid dictionary or object")
    kind = block.get("type")
    if kind not in BLOCK_TYPES:
        raise invalid_request(f"{where}.type: Input tag '{kind}' found using 'type' does not match any of the "
                              "expected tags: " + ", ".join(f"'{t}'" for t in BLOCK_TYPES))
    if kind == "text" and not isinstance(block.get("text"), str):
        raise invalid_request(f"{where}.text: Field required")
    if kind == "tool_use":
        for field in ("id", "name"):
            if not isinstance(block.get(field), str):
                raise invalid_request(f"{where}.{field}: Field required")
        if not isinstance(block.get("input"), dict):
            raise invalid_request(f"{where}.input: Input should be a valid dictionary")
    if kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise invalid_request(f"{where}.tool_use_id: Field required")
        content = block.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(f"{where}.content: Input should be a valid list")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise invalid_request("messages: Field required")
    if not isinstance(messages, list):
        raise invalid_request("messages: Input should be a valid list")
    if not messages:
        raise invalid_request("messages: at least one message is required")
    previous = None
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid_request(f"{where}: Input should be a valid dictionary or object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid_request(f"{where}.role: Input should be 'user' or 'assistant'")
        if role == previous:
            raise invalid_request(f'messages: roles must alternate between "user" and "assistant", but found '
                                  f'multiple "{role}" roles in a row')
        previous = role
        content = message.get("content")
        if isinstance(content, list):
            for position, block in enumerate(content):
                _check_block(block, f"{where}.content.{position}")
        elif not isinstance(content, str):
            raise invalid_request(f"{where}.content: Field required" if content is None
                                  else f"{where}.content: Input should be a valid string or list")
    if messages[0].get("role") != "user":
        raise invalid_request('messages: first message must use the "user" role')


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise invalid_request("system: Input should be a valid string or list")
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise invalid_request(f"system.{index}: Input should be a text block")


def _check_tools(tools: Any, choice: Any) -> None:
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid_request("tools: Input should be a valid list")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise invalid_request(f"tools.{index}.name: Field required")
            names.append(tool["name"])
            schema = tool.get("input_schema")
            if tool.get("type") in (None, "custom"):
                if not isinstance(schema, dict):
                    raise invalid_request(f"tools.{index}.custom.input_schema: Field required")
                if schema.get("type") != "object":
                    raise invalid_request(f"tools.{index}.custom.input_schema.type: Input should be 'object'")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICE_TYPES:
        raise invalid_request("tool_choice: Input tag found using 'type' does not match any of the expected tags: "
                              + ", ".join(f"'{t}'" for t in TOOL_CHOICE_TYPES))
    if choice["type"] == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid_request("tool_choice.tool.name: Field required")
        if name not in names:
            raise invalid_request(f"Tool '{name}' not found in provided tools")
    elif choice["type"] == "any" and not names:
        raise invalid_request("tool_choice: tool_choice.type 'any' requires tools to be provided")


def validate_messages_request(body: Any) -> tuple[str, dict[str, Any]]:
    """(model, body) of a valid Messages request, or Anthropic's 400 (invalid_request_error)."""
    if not isinstance(body, dict):
        raise invalid_request("Input should be a valid dictionary or object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: Field required" if model is None else "model: Input should be a valid string")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise invalid_request("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise invalid_request("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise invalid_request("max_tokens: Input should be greater than or equal to 1")
    _check_messages(body.get("messages"))
    _check_system(body.get("system"))
    _check_tools(body.get("tools"), body.get("tool_choice"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("stream: Input should be a valid boolean")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)
                                    or not 0 <= temperature <= 1):
        raise invalid_request("temperature: Input should be less than or equal to 1")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise invalid_request("stop_sequences: Input should be a valid list of strings")
    return model, body


# --- the request as the answer logic reads it ---------------------------------------------------

def _unmarked(value: Any) -> Any:
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    return value


def system_text(system: Any) -> str | None:
    if system is None:
        return None
    return system if isinstance(system, str) else content_text(system)


def chat_view(body: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions-shaped body of a valid Messages request: `messages` (system first) and `max_tokens`."""
    messages: list[dict[str, Any]] = []
    system = system_text(body.get("system"))
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m["role"], "content": _unmarked(m["content"])} for m in body["messages"])
    return {"messages": messages, "max_tokens": body["max_tokens"]}


def breakpoints(body: dict[str, Any]) -> list[int]:
    """Character offsets, in the prompt text of `chat_view(body)`, where a block marked `cache_control` ends."""
    out: list[int] = []
    pos = 0
    system = body.get("system")
    segments: list[Any] = [] if system is None else [system]
    segments.extend(m["content"] for m in body["messages"])
    for number, segment in enumerate(segments):
        if number:
            pos += 1  # the newline between messages
        if isinstance(segment, str):
            pos += len(segment)
            continue
        for block in segment:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                pos += len(block["text"])
            if isinstance(block, dict) and block.get("cache_control") is not None:
                out.append(pos)
    return out


def offered_tools(body: dict[str, Any]) -> list[ToolSpec]:
    """The custom tools of a valid request (server tools, which have no input schema, are not called)."""
    tools = body.get("tools") or []
    return [ToolSpec(t["name"], offered_schema(t.get("input_schema"))) for t in tools
            if t.get("type") in (None, "custom")]


def ends_with_tool_result(body: dict[str, Any]) -> bool:
    last = body["messages"][-1]
    content = last.get("content")
    return last.get("role") == "user" and isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def required_tool_name(body: dict[str, Any]) -> str | None:
    """`""` when any tool must be called, the tool's name when one is named, None when the answer is text."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or ends_with_tool_result(body):
        return None
    if choice.get("type") == "any":
        return ""
    if choice.get("type") == "tool":
        return str(choice["name"])
    return None


def bad_params(body: Any) -> AnthropicError | None:
    """Anthropic's 400 for a batch request's `params`, or None when they are valid."""
    try:
        validate_messages_request(body)
    except AnthropicError as exc:
        return exc
    return None
