"""The Anthropic kind's translation (tierbatch/providers/anthropic_messages.py, anthropic_stream.py):
OpenAI chat completion requests as Messages params, Messages answers and stream events as chat
completions and chunks, usage with cache reads and writes as our token kinds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tierbatch.ledger.pricing import TokenUsage
from tierbatch.providers.adapter import usage_from_body
from tierbatch.providers.anthropic_messages import (
    JSON_OBJECT_INSTRUCTION,
    Untranslatable,
    to_chat_completion,
    to_messages_params,
)
from tierbatch.providers.anthropic_stream import StreamTranslator

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def params(request: dict[str, Any], cache_key: str | None = None) -> dict[str, Any]:
    return to_messages_params(request, "claude-sonnet-4-5", 4096, cache_key).params


def test_system_and_developer_messages_become_the_system_blocks() -> None:
    sent = params({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                                {"role": "user", "content": "hi"}]})
    assert sent == {"model": "claude-sonnet-4-5", "max_tokens": 4096,
                    "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use French."}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_a_cache_key_marks_the_end_of_the_system_prompt_for_caching() -> None:
    sent = params({"messages": [{"role": "system", "content": "Long rules."}, {"role": "user", "content": "x"}]},
                  cache_key="tierbatch-classification")
    assert sent["system"] == [{"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}]


def test_max_tokens_comes_from_the_request_else_the_providers_default() -> None:
    hi = [{"role": "user", "content": "hi"}]
    assert params({"messages": hi})["max_tokens"] == 4096
    assert to_messages_params({"messages": hi}, "m", 1000).params["max_tokens"] == 1000
    assert params({"messages": hi, "max_tokens": 50})["max_tokens"] == 50
    assert params({"messages": hi, "max_tokens": 50, "max_completion_tokens": 70})["max_tokens"] == 70


def test_stop_and_user_are_translated_and_sampling_and_openai_only_fields_dropped() -> None:
    sent = params({"messages": [{"role": "user", "content": "hi"}], "stop": "END", "temperature": 0,
                   "top_p": 0.9, "seed": 7, "presence_penalty": 0.1, "logprobs": True, "user": "u-1",
                   "prompt_cache_key": "k", "stream_options": {"include_usage": True}})
    assert {k: v for k, v in sent.items() if k not in ("model", "messages", "max_tokens")} == {
        "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}}
    assert params({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b"]})["stop_sequences"] == [
        "a", "b"]


def test_tools_tool_calls_and_tool_results_become_anthropic_blocks() -> None:
    sent = params({
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
            {"role": "user", "content": "Thanks. And tomorrow?"},
        ],
        "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    assert sent["tools"] == [{"name": "weather", "description": "The weather in a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [  # the tool results, then the user's text, in one user turn
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
            {"type": "text", "text": "Thanks. And tomorrow?"}]},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
])
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    sent = params({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": choice})
    assert sent["tool_choice"] == expected


def test_a_json_schema_response_format_is_a_forced_tool_whose_input_is_the_answer() -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    translated = to_messages_params({"messages": [{"role": "user", "content": "Classify: late parcel"}],
                                     "response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "label", "schema": schema}}},
                                    "claude-haiku-4-5", 4096)
    assert translated.response_tool == "label"
    assert translated.params["tools"] == [{"name": "label", "input_schema": schema}]
    assert translated.params["tool_choice"] == {"type": "tool", "name": "label"}

    answer = to_chat_completion({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "label", "input": {"label": "shipping"}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 20, "output_tokens": 8}}, translated.response_tool)
    [choice] = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": '{"label": "shipping"}', "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == {"label": "shipping"}


def test_a_json_object_response_format_is_an_instruction() -> None:
    sent = params({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}})
    assert sent["system"] == [{"type": "text", "text": JSON_OBJECT_INSTRUCTION}]
    assert "tools" not in sent


def test_images_become_image_blocks() -> None:
    sent = params({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]})
    assert sent["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


@pytest.mark.parametrize("request_body", [
    {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "custom", "custom": {"name": "x"}}]},
    {"messages": [{"role": "function", "name": "f", "content": "x"}]},
])
def test_what_has_no_anthropic_equivalent_is_refused(request_body: dict[str, Any]) -> None:
    with pytest.raises(Untranslatable):
        params(request_body)


def test_a_text_answer_with_cache_reads_and_writes() -> None:
    body = to_chat_completion({
        "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 1200, "cache_creation_input_tokens": 300,
                  "output_tokens": 5}}, created=1_700_000_000)
    assert body == {
        "id": "msg_2", "object": "chat.completion", "created": 1_700_000_000, "model": "claude-sonnet-4-5-20250929",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 1510, "completion_tokens": 5, "total_tokens": 1515,
                  "prompt_tokens_details": {"cached_tokens": 1200, "cache_write_tokens": 300}}}
    assert usage_from_body(body) == TokenUsage(input_tokens=1510, cached_tokens=1200, output_tokens=5,
                                               reasoning_tokens=0, cache_write_tokens=300)


def test_thinking_tokens_are_reasoning_tokens() -> None:
    body = to_chat_completion({"id": "m", "model": "c", "content": [{"type": "thinking", "thinking": "hmm"},
                                                                    {"type": "text", "text": "42"}],
                               "stop_reason": "end_turn",
                               "usage": {"input_tokens": 4, "output_tokens": 30,
                                         "output_tokens_details": {"thinking_tokens": 25}}})
    assert body["choices"][0]["message"]["content"] == "42"
    assert usage_from_body(body) == TokenUsage(input_tokens=4, cached_tokens=0, output_tokens=30, reasoning_tokens=25)


def test_a_tool_use_answer_becomes_tool_calls() -> None:
    body = to_chat_completion({
        "id": "msg_3", "model": "claude-sonnet-4-5", "stop_reason": "tool_use",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {"city": "Paris"}}],
        "usage": {"input_tokens": 30, "output_tokens": 12}})
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": "Let me check.", "refusal": None, "tool_calls": [
        {"id": "toolu_9", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}


@pytest.mark.parametrize(("stop_reason", "finish"), [("max_tokens", "length"), ("stop_sequence", "stop"),
                                                     ("refusal", "content_filter")])
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    body = to_chat_completion({"id": "m", "model": "c", "content": [], "stop_reason": stop_reason, "usage": {}})
    assert body["choices"][0]["finish_reason"] == finish
    assert body["choices"][0]["message"]["content"] is None


def _payloads(lines: list[str]) -> list[Any]:
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_stream_is_translated_event_by_event() -> None:
    translator = StreamTranslator(created=1)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_s", "model": "claude-sonnet-4-5", "usage": {
            "input_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                      "name": "weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty":"P"}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    out = [_payloads(translator.feed(event)) for event in events]
    deltas = [[c["choices"][0]["delta"] for c in chunks if c != "[DONE]" and c["choices"]] for chunks in out]
    assert deltas == [
        [{"role": "assistant", "content": ""}], [], [], [{"content": "Hel"}], [{"content": "lo"}], [],
        [{"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                          "function": {"name": "weather", "arguments": ""}}]}],
        [{"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}],
        [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"P"}'}}]}],
        [], [{}], []]
    assert out[10][0]["choices"][0]["finish_reason"] == "tool_calls"
    first = out[0][0]
    assert (first["id"], first["object"], first["model"]) == ("msg_s", "chat.completion.chunk", "claude-sonnet-4-5")
    usage_chunk, done = out[11]
    assert usage_chunk["choices"] == [] and done == "[DONE]"
    assert usage_from_body(usage_chunk) == TokenUsage(input_tokens=107, cached_tokens=100, output_tokens=15)


def test_a_streamed_json_schema_answer_is_content_and_an_error_event_an_openai_error() -> None:
    translator = StreamTranslator(response_tool="label", created=1)
    translator.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})
    assert translator.feed({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "tool_use", "id": "t", "name": "label", "input": {}}}) == []
    [line] = translator.feed({"type": "content_block_delta", "index": 0,
                              "delta": {"type": "input_json_delta", "partial_json": '{"label":"x"}'}})
    assert _payloads([line])[0]["choices"][0]["delta"] == {"content": '{"label":"x"}'}
    [line] = translator.feed({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}})
    assert _payloads([line])[0]["choices"][0]["finish_reason"] == "stop"
    [line] = translator.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert _payloads([line])[0] == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None,
                                              "code": None}}
