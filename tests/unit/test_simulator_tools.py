"""Tool calls in the simulator: schema-driven arguments, the chat side's checks, Anthropic's request view."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tierbatch.providers.openai_validation import InvalidRequest
from tierbatch.simulator.answers import input_key, reference_label
from tierbatch.simulator.anthropic_errors import AnthropicError
from tierbatch.simulator.chat_tools import check_tools, tool_answer
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.messages_answer import answer_message
from tierbatch.simulator.messages_request import breakpoints, chat_view, validate_messages_request
from tierbatch.simulator.tokens import PrefixCache, prompt_text
from tierbatch.simulator.tool_arguments import ToolSpec, schema_instance, tool_arguments

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {}},
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                                            "maximum": 7}},
     "required": ["city", "days"], "additionalProperties": False},
    {"type": "object", "properties": {
        "label": {"type": "string", "enum": ["billing", "account", "bug"]},
        "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 30, "maxLength": 40},
                 "minItems": 3, "maxItems": 5},
        "meta": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                                  "when": {"type": "string", "format": "date-time"},
                                                  "ok": {"type": "boolean"}, "none": {"type": "null"}},
                 "required": ["id", "ok"]},
    }, "required": ["label", "confidence", "tags", "meta"]},
    {"type": "object", "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "maxLength": 3}, "qty": {"type": "integer", "multipleOf": 5, "minimum": 11}},
        "required": ["sku", "qty"]}},
     "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 2},
                    "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                    "mode": {"oneOf": [{"const": "fast"}, {"type": "integer", "maximum": -3}]},
                    "both": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}},
                                        "required": ["a"]},
                                       {"properties": {"b": {"type": ["string", "null"]}}, "required": ["b"]}]},
                    "unique": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 3,
                               "uniqueItems": True},
                    "free": {}},
     "required": ["items", "note", "mode", "both", "unique", "free"]},
    {"type": "object", "required": ["anything"], "additionalProperties": {"type": "integer", "maximum": 0}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_arguments_are_valid_and_deterministic(schema: dict[str, Any]) -> None:
    tool = ToolSpec("fn", schema)
    for i in range(20):
        key = f"input {i}"
        value = tool_arguments(tool, key, "m", ModelSettings())
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
        assert value == tool_arguments(tool, key, "m", ModelSettings())
        assert set(schema.get("required", ())) <= set(value)


def test_number_bounds_and_strings() -> None:
    for seed in map(str, range(50)):
        assert 3 <= schema_instance({"type": "integer", "minimum": 3, "maximum": 4}, {}, seed) <= 4
        assert schema_instance({"type": "integer", "exclusiveMinimum": 100}, {}, seed) > 100
        value = schema_instance({"type": "number", "minimum": -2.5, "maximum": -2.4}, {}, seed)
        assert -2.5 <= value <= -2.4
        assert len(schema_instance({"type": "string", "minLength": 200}, {}, seed)) >= 200


def test_an_enum_in_the_schema_is_a_classification_with_agreement() -> None:
    labels = ("billing", "account", "bug")
    tool = ToolSpec("route", {"type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
                              "required": ["label"]})
    reference = ModelSettings(reference=True)
    never = ModelSettings(agreement=0.0)
    for i in range(30):
        key = f"ticket {i}"
        assert tool_arguments(tool, key, "ref", reference)["label"] == reference_label(labels, key)
        assert tool_arguments(tool, key, "contrarian", never)["label"] != reference_label(labels, key)


def _chat(tool_choice: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "What is the weather?"}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": SCHEMAS[1]}},
                      {"type": "function", "function": {"name": "other"}}],
            "tool_choice": tool_choice, **extra}


def test_chat_tool_choice_decides_between_a_call_and_text() -> None:
    settings = ModelSettings()
    named = tool_answer(_chat({"type": "function", "function": {"name": "weather"}}), "m", settings)
    assert named is not None
    (call,) = named.choices[0].tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.name == "weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[1])
    assert tool_answer(_chat("required"), "m", settings) is not None
    assert tool_answer(_chat("auto"), "m", settings) is None
    assert tool_answer(_chat(None), "m", settings) is None
    after = _chat("required")
    after["messages"] += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert tool_answer(after, "m", settings) is None  # a final answer in text
    many = tool_answer(_chat("required", n=2), "m", settings)
    assert many is not None and len(many.choices) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "web"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
])
def test_chat_tool_checks(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_tools(body)
    assert info.value.param == param


def _messages(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(("body", "needle"), [
    ({"model": "c", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
    (_messages(max_tokens=0), "greater than or equal to 1"),
    (_messages(messages=[]), "at least one message"),
    (_messages(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "alternate"),
    (_messages(messages=[{"role": "system", "content": "a"}]), "'user' or 'assistant'"),
    (_messages(messages=[{"role": "assistant", "content": "a"}]), "first message"),
    (_messages(system=5), "system"),
    (_messages(tools=[{"name": "f"}]), "input_schema"),
    (_messages(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice={"type": "tool", "name": "g"}),
     "not found"),
    (_messages(tool_choice={"type": "any"}), "requires tools"),
])
def test_messages_request_checks(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(AnthropicError) as info:
        validate_messages_request(body)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    assert needle in info.value.message


def test_messages_view_matches_the_chat_prompt() -> None:
    body = _messages(system=[{"type": "text", "text": "Route the ticket.", "cache_control": {"type": "ephemeral"}}],
                     messages=[{"role": "user", "content": "Ticket: charged twice\nLabels: billing, account, bug"}])
    view = chat_view(body)
    chat_messages = [{"role": "system", "content": "Route the ticket."},
                     {"role": "user", "content": "Ticket: charged twice\nLabels: billing, account, bug"}]
    assert view["messages"] == chat_messages
    answer = answer_message(body, "claude", ModelSettings(reference=True), PrefixCache())
    assert answer.content == [{"type": "text", "text": reference_label(("billing", "account", "bug"),
                                                                       input_key(chat_messages))}]
    assert breakpoints(body) == [len("Route the ticket.")]


def test_cache_writes_then_reads_and_breakpoints() -> None:
    cache = PrefixCache()
    long = "x" * 4500  # 1,125 tokens, not on a 128-token boundary
    body = _messages(system=[{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}],
                     messages=[{"role": "user", "content": "first"}])
    first = answer_message(body, "claude", ModelSettings(), cache)
    assert (first.cache_read, first.cache_write) == (0, 1125)
    body["messages"] = [{"role": "user", "content": "second question"}]
    second = answer_message(body, "claude", ModelSettings(), cache)
    assert second.cache_read == 1125 and second.cache_write == 0
    text = prompt_text(chat_view(body)["messages"])
    assert second.input_tokens == -(-len(text) // 4) - 1125
    # without a mark, the chat side's 128-token boundaries from 1,024 on
    assert cache.read_and_write("other", long, 1125) == (0, 1024)
    assert cache.read_and_write("other", long, 1125) == (1024, 0)
    assert cache.lookup_and_store("other", long) == 1024  # the same entries as the chat side
