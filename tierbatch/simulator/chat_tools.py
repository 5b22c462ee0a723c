"""Tools on the chat side: `tools` and `tool_choice` checked like OpenAI does, and the `tool_calls` answer.

A request that offers functions and requires a call (`tool_choice: "required"`, or a named function)
gets one call per choice (finish_reason `tool_calls`), its arguments from `tool_arguments`. With
`"auto"`, `"none"` or no `tool_choice`, and whenever the last message is a tool result (role `tool`),
the answer is text as before.
"""

from __future__ import annotations

from typing import Any

from tierbatch.providers import openai_validation as shared
from tierbatch.simulator.answers import Answer, Choice, ToolCall, input_key
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.tokens import count_tokens, prompt_text
from tierbatch.simulator.tool_arguments import (
    ToolSpec,
    arguments_json,
    offered_schema,
    pick_tool,
    tool_arguments,
    tool_call_id,
)

TOOL_CHOICES = ("none", "auto", "required")


def offered_tools(body: dict[str, Any]) -> list[ToolSpec]:
    """The functions of a checked request's `tools`."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [ToolSpec(t["function"]["name"], offered_schema(t["function"].get("parameters"))) for t in tools]


def check_tools(body: dict[str, Any]) -> None:
    """OpenAI's 400s for `tools` and `tool_choice` (raises `InvalidRequest`)."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise shared.invalid_type("tools", "an array", tools)
        for index, tool in enumerate(tools):
            where = f"tools[{index}]"
            if not isinstance(tool, dict):
                raise shared.invalid_type(where, "an object", tool)
            if tool.get("type") != "function":
                raise shared.InvalidRequest(f"Invalid value: '{tool.get('type')}'. Supported values are: "
                                            "'function' and 'custom'.", f"{where}.type", "invalid_value")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise shared.missing(f"{where}.function")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise shared.missing(f"{where}.function.name")
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise shared.invalid_type(f"{where}.function.parameters", "an object", parameters)
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise shared.InvalidRequest(f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and "
                                        "'required'.", "tool_choice", "invalid_value")
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or not isinstance(
                function.get("name"), str):
            raise shared.missing("tool_choice.function.name")
    else:
        raise shared.invalid_type("tool_choice", "a string or an object", choice)
    if not tools:
        if choice == "none":
            return
        raise shared.InvalidRequest("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                                    "are specified.", "tool_choice", None)
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in {t["function"]["name"] for t in tools}:
            raise shared.InvalidRequest(f"Invalid value for 'tool_choice': no function named '{name}' was "
                                        "specified in the 'tools' parameter.", "tool_choice", None)


def required_tool(body: dict[str, Any], key: str) -> ToolSpec | None:
    """The function a checked request must call, or None when the answer is text."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto"):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and (
            messages[-1].get("role") == "tool"):
        return None  # a tool result came back: the final answer is text
    tools = offered_tools(body)
    if not tools:
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(t for t in tools if t.name == name)
    return pick_tool(tools, key)


def tool_answer(body: dict[str, Any], model: str, settings: ModelSettings) -> Answer | None:
    """The `tool_calls` answer of a checked request that requires a call, else None."""
    messages = body["messages"]
    key = input_key(messages)
    tool = required_tool(body, key)
    if tool is None:
        return None
    n = body.get("n") or 1
    choices = []
    visible = 0
    for index in range(n):
        salt = str(index) if index else ""
        arguments = arguments_json(tool_arguments(tool, key, model, settings, salt))
        call = ToolCall(tool_call_id("call_", key, tool.name, salt), tool.name, arguments)
        visible += count_tokens(tool.name) + count_tokens(arguments)
        choices.append(Choice("", "tool_calls", (call,)))
    text = prompt_text(messages)
    reasoning = settings.reasoning_tokens * n
    return Answer(choices=choices, prompt_text=text, prompt_tokens=count_tokens(text),
                  completion_tokens=visible + reasoning, reasoning_tokens=reasoning)
