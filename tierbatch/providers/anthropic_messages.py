"""OpenAI chat completion requests as Anthropic Messages API params, and Messages back as chat
completions. Pure: no SDK, no I/O (the adapter, `tierbatch.providers.anthropic_adapter`, sends them).

Requests (`to_messages_params`):
- `system` and `developer` messages, wherever they stand, become the top-level `system` blocks, in order;
  with a `cache_key` (the provider's config allows prompt caching) the last one is marked
  `cache_control: ephemeral`, so the shared prefix of a job's calls (system prompt first) is cached
- `user` / `assistant` turns keep their roles (consecutive turns of one role are merged, as Anthropic
  wants them alternating); text parts become text blocks, `image_url` parts image blocks (data URLs
  as base64, others by URL); assistant `tool_calls` become `tool_use` blocks; `tool` messages become
  `tool_result` blocks of a user turn
- `tools` (function tools) and the deprecated `functions` become Anthropic tools; `tool_choice` /
  `function_call`: `auto`, `required` (Anthropic's `any`), `none`, or a named function;
  `parallel_tool_calls: false` sets `disable_parallel_tool_use`
- `response_format` `json_schema`: a tool named for the schema, whose input schema is the schema, is
  forced; the answer's tool input becomes the message content, as JSON text (`finish_reason` `stop`).
  `json_object`: an instruction to answer with one JSON object, added to the system blocks
- `stop` becomes `stop_sequences`; `user` (else `safety_identifier`) becomes `metadata.user_id`
- `max_completion_tokens`, else `max_tokens`, else the provider's `default_max_tokens` (4096 unless
  configured): Anthropic requires a limit
- dropped, as Anthropic has no such thing: `temperature` and `top_p` (the Messages API of the SDK in
  use takes no sampling parameters, and current models refuse them), `seed`, `presence_penalty`, `frequency_penalty`,
  `logit_bias`, `logprobs`, `top_logprobs`, `reasoning_effort`, `verbosity`, `prediction`,
  `service_tier`, `modalities`, `store`, `prompt_cache_key`, `prompt_cache_retention`
- refused (`Untranslatable`, a permanent error: the chain moves on to its next model): `n` above 1,
  `custom` tools, content parts other than text and images, `function` role messages

Answers (`to_chat_completion`): `id`, `model` (Anthropic's, the served model), one choice with the text
and/or `tool_calls`, `finish_reason` from `stop_reason`, and `usage` with `prompt_tokens` = input + cache
read + cache write tokens, `prompt_tokens_details.cached_tokens` = cache reads,
`prompt_tokens_details.cache_write_tokens` = cache writes, `completion_tokens` = output tokens (thinking
included, as OpenAI counts reasoning), `completion_tokens_details.reasoning_tokens` = thinking tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierbatch.providers.adapter import CACHE_WRITE_FIELD

JSON_OBJECT_INSTRUCTION = "Answer with a single JSON object and nothing else."
DEFAULT_RESPONSE_TOOL = "json_response"

FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter"}


class Untranslatable(ValueError):
    """A request that has no Anthropic equivalent."""


@dataclass(frozen=True, slots=True)
class Translated:
    """Messages API params, and what reading the answer needs to know of the request."""

    params: dict[str, Any]
    response_tool: str | None = None  # the forced tool of a `json_schema` response format


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise Untranslatable(f"{where}: only text parts can be translated here")
            texts.append(str(part.get("text") or ""))
        return "".join(texts)
    raise Untranslatable(f"{where}: content must be a string or an array of parts")


def _image_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise Untranslatable(f"{where}: image_url has no url")
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64":
            raise Untranslatable(f"{where}: an image data URL must be base64")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise Untranslatable(f"{where}: content must be a string or an array of parts")
    blocks = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}[{index}]"))
        else:
            raise Untranslatable(f"{where}[{index}]: content parts of type {kind!r} cannot be translated")
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        raise Untranslatable(f"{where}: only function tool calls can be translated")
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = json.loads(arguments)
    except ValueError:
        raise Untranslatable(f"{where}: the arguments are not JSON") from None
    if not isinstance(tool_input, dict):
        raise Untranslatable(f"{where}: the arguments are not a JSON object")
    return {"type": "tool_use", "id": str(call.get("id") or ""), "name": str(function.get("name") or ""),
            "input": tool_input}


def _turns(messages: Sequence[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, alternating user/assistant turns)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise Untranslatable(f"{where}: not an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, where))
            continue
        if role == "user":
            blocks = _content_blocks(content, f"{where}.content")
        elif role == "assistant":
            blocks = [b for b in _content_blocks(content, f"{where}.content") if b.get("text", True)]
            blocks += [_tool_use(call, f"{where}.tool_calls[{i}]")
                       for i, call in enumerate(message.get("tool_calls") or [])]
        elif role == "tool":
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or ""),
                       "content": _text_of(content, f"{where}.content")}]
        else:
            raise Untranslatable(f"{where}: messages of role {role!r} cannot be translated")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise Untranslatable(f"{where}: not an object")
    function = tool.get("function") if "function" in tool else tool  # `functions` entries are bare
    if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise Untranslatable(f"{where}: only function tools can be translated")
    translated: dict[str, Any] = {"name": str(function.get("name") or ""),
                                  "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        translated["description"] = str(function["description"])
    return translated


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, Mapping):
        function = choice.get("function") if "function" in choice else choice  # `function_call: {"name"}`
        if isinstance(function, Mapping) and function.get("name"):
            return {"type": "tool", "name": str(function["name"])}
    raise Untranslatable("tool_choice: cannot be translated")


def to_messages_params(request: Mapping[str, Any], model: str, default_max_tokens: int,
                       cache_key: str | None = None, response_tool_name: str | None = None) -> Translated:
    """The Messages API params of an OpenAI chat completion request (see the module docstring).
    `response_tool_name` names the forced tool of a `json_schema` response format, instead of the schema's
    name (batch lines: their answers are read without the request)."""
    if int(request.get("n") or 1) != 1:
        raise Untranslatable("n: Anthropic answers one choice per call")
    system, turns = _turns(request.get("messages") or [])
    params: dict[str, Any] = {"model": model, "messages": turns}
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or default_max_tokens
    params["max_tokens"] = int(max_tokens)
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(request.get("tools") or [])]
    tools += [_tool(f, f"functions[{i}]") for i, f in enumerate(request.get("functions") or [])]
    choice = _tool_choice(request.get("tool_choice", request.get("function_call")))
    response_tool = None
    response_format = request.get("response_format")
    if not isinstance(response_format, Mapping):
        response_format = {}
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        response_tool = response_tool_name or str(spec.get("name") or DEFAULT_RESPONSE_TOOL)
        tool: dict[str, Any] = {"name": response_tool,
                                "input_schema": spec.get("schema") or {"type": "object"}}
        if spec.get("description"):
            tool["description"] = str(spec["description"])
        tools.append(tool)
        # alone (or with tools turned off), the answer is the forced tool's input; beside the caller's
        # tools, some tool must be called: the caller's, or the answer's
        if len(tools) == 1 or (choice is not None and choice["type"] == "none"):
            choice = {"type": "tool", "name": response_tool}
        elif choice is None or choice["type"] == "auto":
            choice = {"type": "any"}
    elif kind == "json_object":
        system.append(JSON_OBJECT_INSTRUCTION)
    if system:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": text} for text in system if text]
        if blocks and cache_key is not None:
            blocks[-1]["cache_control"] = {"type": "ephemeral"}
        if blocks:
            params["system"] = blocks
    if tools:
        params["tools"] = tools
    if choice is not None:
        if request.get("parallel_tool_calls") is False and choice["type"] in ("auto", "any", "tool"):
            choice = {**choice, "disable_parallel_tool_use": True}
        params["tool_choice"] = choice
    stop = request.get("stop")
    if stop:
        params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    user = request.get("user") or request.get("safety_identifier")
    if user:
        params["metadata"] = {"user_id": str(user)}
    return Translated(params, response_tool)


def chat_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic's usage as a chat completion's: cache reads and writes are parts of the prompt."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + written
    completion = int(usage.get("output_tokens") or 0)
    chat: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                            "prompt_tokens_details": {"cached_tokens": read, CACHE_WRITE_FIELD: written}}
    details = usage.get("output_tokens_details")
    if isinstance(details, Mapping) and details.get("thinking_tokens"):
        chat["completion_tokens_details"] = {"reasoning_tokens": int(details["thinking_tokens"])}
    return chat


def finish_reason(stop_reason: str | None, response_tool: str | None) -> str | None:
    if stop_reason is None:
        return None
    if stop_reason == "tool_use" and response_tool is not None:
        return "stop"
    return FINISH_REASONS.get(stop_reason, "stop")


def tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": block.get("id"), "type": "function",
            "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {},
                                                                            ensure_ascii=False)}}


def to_chat_completion(message: Mapping[str, Any], response_tool: str | None = None,
                       created: int | None = None) -> dict[str, Any]:
    """A Messages API answer as a chat completion body (see the module docstring)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use" and response_tool is not None and block.get("name") == response_tool:
            texts.append(json.dumps(block.get("input") or {}, ensure_ascii=False))
        elif kind == "tool_use":
            calls.append(tool_call(block))
    # `refusal` is required (nullable) in OpenAI's message schema; Anthropic has no such field
    chat_message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                                    "refusal": None}
    if calls:
        chat_message["tool_calls"] = calls
    reason = finish_reason(message.get("stop_reason"), response_tool if not calls else None)
    return {"id": message.get("id"), "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": message.get("model"),
            "choices": [{"index": 0, "message": chat_message, "finish_reason": reason, "logprobs": None}],
            "usage": chat_usage(message.get("usage") or {})}
