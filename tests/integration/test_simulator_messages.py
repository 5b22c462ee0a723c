"""The simulator's Anthropic side as a real process, reached through the `anthropic` SDK (whose own types parse
every answer): messages, streams, errors, cache tokens, message batches; tool calls through both SDKs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import Message, ToolUseBlock
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from tests.integration.test_simulator_process import Sim, start
from tierbatch.simulator.answers import input_key, reference_label

pytestmark = pytest.mark.integration

CONFIG = """
[batch]
validating_seconds = 0.1
in_progress_seconds = 0.3
finalizing_seconds = 0.1
cancelling_seconds = 0.1
[models."*"]
latency_ms = [0, 0]
agreement = 0.95
[models."claude-ref"]
reference = true
served_as = "claude-ref-20250101"
"""
LABELS = ["billing", "account", "bug"]
VERSION = {"anthropic-version": "2023-06-01"}
ROUTE_TOOL: Any = {
    "name": "route_ticket", "description": "Route a support ticket.",
    "input_schema": {"type": "object", "properties": {
        "label": {"type": "string", "enum": LABELS},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "notes": {"type": "array", "items": {"type": "object", "properties": {"text": {"type": "string"}},
                                             "required": ["text"]}, "minItems": 1},
    }, "required": ["label", "priority", "notes"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    with start(tmp_path_factory.mktemp("sim"), CONFIG) as sim:
        yield sim


@pytest.fixture
def sim(sim_process: Sim) -> Iterator[Sim]:
    sim_process.restore()
    try:
        yield sim_process
    finally:
        sim_process.restore()


@pytest.fixture
def claude(sim: Sim) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=sim.base, api_key="sk-ant-unused", max_retries=0)
    try:
        yield client
    finally:
        client.close()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def blocks(message: Message) -> list[dict[str, Any]]:
    """The content blocks' own fields (a streamed message's blocks are the SDK's parsed subclasses)."""
    return [block.model_dump(include={"type", "text", "id", "name", "input"}) for block in message.content]


def test_a_message(claude: anthropic.Anthropic, sim: Sim) -> None:
    message = claude.messages.create(model="claude-ref", max_tokens=200, system="Be brief.",
                                     messages=user("Explain the outage."))
    assert isinstance(message, Message)
    assert message.model == "claude-ref-20250101" and message.role == "assistant"
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"
    again = claude.messages.create(model="claude-ref", max_tokens=200, system="Be brief.",
                                   messages=user("Explain the outage."))
    assert again.content == message.content  # deterministic
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0
    cut = claude.messages.create(model="m", max_tokens=3, messages=user("Explain the outage."))
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    assert sim.stats()["messages_calls"] == {"claude-ref": 2, "m": 1}


def test_labels_in_the_system_prompt_agree_with_the_chat_side(claude: anthropic.Anthropic, sim: Sim) -> None:
    system = "Route the support ticket.\nLabels: billing, account, bug"
    text = "Ticket: I was charged twice"
    chat = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    reference = reference_label(tuple(LABELS), input_key(chat))
    message = claude.messages.create(model="claude-ref", max_tokens=20, system=system, messages=user(text))
    assert message.content[0].type == "text" and message.content[0].text == reference
    openai_answer = sim.client.chat.completions.create(model="gpt-4o", messages=chat)  # type: ignore[arg-type]
    assert openai_answer.choices[0].message.content == reference


def test_a_stream_and_its_final_message(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(model="claude-ref", max_tokens=200, messages=user("Summarise the report."))
    with claude.messages.stream(model="claude-ref", max_tokens=200, messages=user("Summarise the report.")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert blocks(final) == blocks(whole) and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    events = []
    with claude.messages.create(model="claude-ref", max_tokens=200, messages=user("Summarise the report."),
                                stream=True) as raw:
        events = [event.type for event in raw]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(events)


def test_errors(claude: anthropic.Anthropic, sim: Sim) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": user("hi")}
    missing = httpx.post(f"{sim.base}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=10)
    assert missing.status_code == 400
    assert missing.json()["type"] == "error"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in missing.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="m", max_tokens=5, messages=[{"role": "assistant", "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    unknown = httpx.get(f"{sim.base}/v1/messages/batches/msgbatch_nope", headers=VERSION, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    sim.configure({"models": {"busy": {"error_rate": 1.0, "error_status": 529},
                              "limited": {"error_rate": 1.0, "error_status": 429, "retry_after_seconds": 3},
                              "broken": {"error_rate": 1.0, "error_status": 500}}})
    with pytest.raises(anthropic.InternalServerError) as busy:
        claude.messages.create(model="busy", max_tokens=5, messages=user("hi"))
    assert isinstance(busy.value, anthropic.APIStatusError) and busy.value.status_code == 529
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(model="limited", max_tokens=5, messages=user("hi"))
    assert limited.value.status_code == 429 and limited.value.response.headers["retry-after"] == "3"
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError) as broken:
        claude.messages.create(model="broken", max_tokens=5, messages=user("hi"))
    assert broken.value.status_code == 500
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert sim.stats()["messages_errors"] == {"busy": 1, "limited": 1, "broken": 1}
    # the chat side answers the same 529 setting with OpenAI's overloaded 503
    import openai
    with pytest.raises(openai.InternalServerError) as chat_busy:
        sim.client.chat.completions.create(model="busy", messages=user("hi"))
    assert chat_busy.value.status_code == 503


def test_api_key(tmp_path: Path) -> None:
    with start(tmp_path, 'api_key = "sk-sim-secret"\n[models."*"]\nlatency_ms = [0, 0]\n') as sim:
        wrong = anthropic.Anthropic(base_url=sim.base, api_key="sk-wrong", max_retries=0)
        right = anthropic.Anthropic(base_url=sim.base, api_key="sk-sim-secret", max_retries=0)
        try:
            with pytest.raises(anthropic.AuthenticationError) as info:
                wrong.messages.create(model="m", max_tokens=5, messages=user("hi"))
            assert info.value.status_code == 401
            assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
            assert right.messages.create(model="m", max_tokens=5, messages=user("hi")).content
            body = {"model": "m", "max_tokens": 5, "messages": user("x")}
            for headers, status in (({"x-api-key": "sk-sim-secret"}, 200), ({"x-api-key": "sk-wrong"}, 401),
                                    ({}, 401), ({"authorization": "Bearer sk-wrong"}, 401)):
                answer = httpx.post(f"{sim.base}/v1/messages", json=body, headers={**headers, **VERSION}, timeout=10)
                assert answer.status_code == status, headers
                if status == 401:
                    assert answer.json()["error"]["type"] == "authentication_error"
        finally:
            wrong.close()
            right.close()
        assert sim.stats()["messages_calls"] == {"m": 2}  # rejected calls never reached the model


def test_cache_tokens_on_a_repeated_long_prefix(claude: anthropic.Anthropic) -> None:
    system = "You are a careful assistant. " * 172  # 4,988 characters: 1,247 tokens
    marked = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    first = claude.messages.create(model="cache-model", max_tokens=50, system=marked,  # type: ignore[arg-type]
                                   messages=user("A: first question"))
    second = claude.messages.create(model="cache-model", max_tokens=50, system=marked,  # type: ignore[arg-type]
                                    messages=user("B: second question"))
    assert first.usage.cache_read_input_tokens == 0 and first.usage.cache_creation_input_tokens == 1247
    assert second.usage.cache_read_input_tokens == 1247 and second.usage.cache_creation_input_tokens == 0
    total = -(-(len(system) + 1 + len("B: second question")) // 4)
    assert second.usage.input_tokens == total - 1247
    # unmarked, a repeated prefix is read on the chat side's 128-token boundaries
    plain = [claude.messages.create(model="plain-cache", max_tokens=50, system=system, messages=user(q))
             for q in ("A: first question", "B: second question")]
    assert plain[0].usage.cache_creation_input_tokens == 1152 and plain[0].usage.cache_read_input_tokens == 0
    assert plain[1].usage.cache_read_input_tokens == 1152


def _batch_requests(count: int) -> list[Any]:
    return [{"custom_id": f"req-{i}", "params": {"model": "claude-ref", "max_tokens": 50,
                                                 "messages": user(f"Ticket {i}: summarise it.")}}
            for i in range(count)]


def _wait_ended(claude: anthropic.Anthropic, batch_id: str, timeout: float = 15.0) -> MessageBatch:
    deadline = time.monotonic() + timeout
    while True:
        batch = claude.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended" or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def test_a_batch_ends_with_results(claude: anthropic.Anthropic, sim: Sim) -> None:
    requests = _batch_requests(5)
    requests.append({"custom_id": "bad", "params": {"model": "claude-ref", "messages": user("no max_tokens")}})
    created = claude.messages.batches.create(requests=requests)
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 6
    ended = _wait_ended(claude, created.id)
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert ended.request_counts.succeeded == 5 and ended.request_counts.errored == 1
    assert ended.request_counts.processing == 0
    results = {r.custom_id: r for r in claude.messages.batches.results(created.id)}
    assert set(results) == {f"req-{i}" for i in range(5)} | {"bad"}
    for custom_id, result in results.items():
        assert isinstance(result, MessageBatchIndividualResponse)
        if custom_id == "bad":
            assert result.result.type == "errored"
            assert result.result.error.error.type == "invalid_request_error"
            continue
        assert result.result.type == "succeeded"
        assert result.result.message.usage.service_tier == "batch"
    raw = httpx.get(f"{sim.base}/v1/messages/batches/{created.id}/results", headers=VERSION, timeout=10)
    for line in raw.text.splitlines():
        MessageBatchIndividualResponse.model_validate(json.loads(line))
    stats = sim.stats()
    assert stats["message_batches_created"] == 1 and stats["message_batch_requests"] == 6


def test_cancel_list_and_expire(claude: anthropic.Anthropic, sim: Sim) -> None:
    sim.configure({"batch": {"in_progress_seconds": 30}})
    slow = claude.messages.batches.create(requests=_batch_requests(4))
    canceling = claude.messages.batches.cancel(slow.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    ended = _wait_ended(claude, slow.id)
    assert ended.processing_status == "ended" and ended.request_counts.canceled == 4
    assert {r.result.type for r in claude.messages.batches.results(slow.id)} == {"canceled"}
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.cancel(slow.id)
    sim.configure({"batch": {"in_progress_seconds": 0.1, "expire": True, "expire_completed_share": 0.5}})
    expiring = claude.messages.batches.create(requests=_batch_requests(4))
    counts = _wait_ended(claude, expiring.id).request_counts
    assert (counts.succeeded, counts.expired) == (2, 2)
    newest = claude.messages.batches.list(limit=1)
    assert [b.id for b in newest.data] == [expiring.id] and newest.has_more
    everything = [b.id for b in claude.messages.batches.list(limit=1)]  # the SDK follows after_id
    assert everything[:2] == [expiring.id, slow.id]
    newer = httpx.get(f"{sim.base}/v1/messages/batches", params={"before_id": slow.id}, headers=VERSION,
                      timeout=10).json()
    assert [b["id"] for b in newer["data"]] == [expiring.id]
    assert sim.stats()["message_batches_by_status"]["ended"] >= 2


def test_tool_use_through_the_anthropic_sdk(claude: anthropic.Anthropic) -> None:
    schema = ROUTE_TOOL["input_schema"]
    text = "Ticket: the app crashes on start"
    tools: Any = [ROUTE_TOOL]
    forced = claude.messages.create(model="claude-ref", max_tokens=100, tools=tools,
                                    tool_choice={"type": "tool", "name": "route_ticket"}, messages=user(text))
    assert forced.stop_reason == "tool_use"
    (block,) = forced.content
    assert isinstance(block, ToolUseBlock) and block.name == "route_ticket" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, schema)
    assert block.input["label"] == reference_label(tuple(LABELS), input_key(user(text)))
    anyone = claude.messages.create(model="claude-ref", max_tokens=100, tools=tools,
                                    tool_choice={"type": "any"}, messages=user(text))
    assert anyone.content == forced.content
    auto = claude.messages.create(model="claude-ref", max_tokens=100, tools=tools, messages=user(text))
    assert auto.stop_reason == "end_turn" and auto.content[0].type == "text"
    with claude.messages.stream(model="claude-ref", max_tokens=100, tools=tools,
                                tool_choice={"type": "any"}, messages=user(text)) as stream:
        streamed = stream.get_final_message()
    assert blocks(streamed) == blocks(forced) and streamed.stop_reason == "tool_use"
    follow_up = [*user(text), {"role": "assistant", "content": [block.model_dump()]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "routed"}]}]
    final = claude.messages.create(model="claude-ref", max_tokens=100, tools=tools,
                                   tool_choice={"type": "any"}, messages=follow_up)
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"


def test_tool_calls_through_the_openai_sdk(sim: Sim) -> None:
    schema = ROUTE_TOOL["input_schema"]
    tools: Any = [{"type": "function", "function": {"name": "route_ticket", "parameters": schema}}]
    messages: Any = user("Ticket: my password reset mail never arrives")
    forced = sim.client.chat.completions.create(model="gpt-4o", messages=messages, tools=tools,
                                                tool_choice="required")
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "route_ticket"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    named = sim.client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools,
        tool_choice={"type": "function", "function": {"name": "route_ticket"}})
    assert named.choices[0].message.tool_calls == choice.message.tool_calls  # deterministic
    auto = sim.client.chat.completions.create(model="gpt-4o", messages=messages, tools=tools)
    assert auto.choices[0].finish_reason == "stop" and auto.choices[0].message.content
    stream = sim.client.chat.completions.create(model="gpt-4o", messages=messages, tools=tools,
                                                tool_choice="required", stream=True)
    with stream:
        parts = list(stream)
    pieces = [tc for p in parts if p.choices for tc in p.choices[0].delta.tool_calls or []]
    assert pieces[0].id == call.id and pieces[0].function is not None and pieces[0].function.name == "route_ticket"
    assert "".join(p.function.arguments or "" for p in pieces if p.function) == call.function.arguments
    assert parts[-1].choices[0].finish_reason == "tool_calls"
    follow_up = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "routed"}]
    final = sim.client.chat.completions.create(model="gpt-4o", messages=follow_up, tools=tools,
                                               tool_choice="required")
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    with pytest.raises(Exception) as refused:
        sim.client.chat.completions.create(model="gpt-4o", messages=messages, tool_choice="required")
    assert getattr(refused.value, "status_code", None) == 400
