"""A `kind = "anthropic"` provider on the real stack: the simulator's Anthropic side serves the complex
tier (tasks through the worker, `smart-select` calls through the gateway, streamed and not), tool calls
round-trip on both provider kinds, and an Anthropic model falls back to an OpenAI-compatible one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from jsonschema import validate as validate_schema
from openai import OpenAI

from tests.integration.conftest import delete_redis_keys
from tests.support.openapi import validate
from tests.support.procs import wait_until
from tests.support.stack import Stack, own_stack, psycopg_dsn

pytestmark = pytest.mark.integration

CLAUDE = "claude-haiku-4-5"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}


def anthropic_config(path: Path, simulator_port: int) -> Path:
    path.write_text(f"""
[providers.sim]
base_url = "http://127.0.0.1:{simulator_port}/v1"
batch = true
prices_from = "openai"

[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{simulator_port}"
batch = true
prices_from = "anthropic"
batch_discount = 0.5

[tiers.light]
provider = "sim"
model = "gpt-4o-mini"

[tiers.complex]
provider = "claude"
model = "{CLAUDE}"
fallbacks = [{{ provider = "sim", model = "gpt-4o" }}]

[quality]
shadow_rate = 0.0

[immediate]
max_attempts = 2
retries_per_model = 0
backoff_base_seconds = 0.05
backoff_max_seconds = 0.2
lease_seconds = 3

[limits]
failed_auth_per_minute = 100000
""")
    return path


@pytest.fixture(scope="module")
def claude_stack(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(base_database_url, Path(tmp_path_factory.mktemp("anthropic-kind")), "tierbatch_anthropic",
                   anthropic_config, beat=False) as running:
        yield running


@pytest.fixture
def stack(claude_stack: Stack) -> Stack:
    claude_stack.sim("POST", "/_sim/reset")
    delete_redis_keys(f"{claude_stack.redis_prefix}tierbatch:cooldown:")
    return claude_stack


def sdk(stack: Stack, key: str) -> OpenAI:
    return OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=30)


def ledger(stack: Stack, task_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT provider, mode::text, requested_model, served_model, input_tokens, cached_tokens, "
                    "cache_write_tokens, output_tokens, cost_usd, unpriced, usage_estimated FROM ledger_entries "
                    "WHERE task_id = %s ORDER BY created_at", (task_id,))
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def messages_calls(stack: Stack) -> dict[str, int]:
    return dict(stack.sim("GET", "/_sim/stats")["messages_calls"])


def test_a_complex_task_is_served_by_the_anthropic_provider(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key("tasks")) as client:
        accepted = client.post("/v1/tasks", json={
            "prompt": "Explain the trade-offs of event sourcing for an invoicing system.", "tier": "complex"})
        assert accepted.status_code == 202, accepted.text
        task = stack.wait_for_task(client, accepted.json()["id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task
    assert task["model"] == CLAUDE and task["served_model"].startswith("claude-haiku-4-5")
    assert task["output"]
    # the stored answer is a chat completion, whatever the provider's wire format
    validate(task["response"], "CreateChatCompletionResponse")
    assert task["usage"]["input_tokens"] > 0 and task["usage"]["output_tokens"] > 0
    [row] = ledger(stack, task["id"])
    assert (row["provider"], row["mode"], row["unpriced"]) == ("claude", "immediate", False)
    assert row["cost_usd"] is not None and row["cost_usd"] > 0
    assert messages_calls(stack).get(CLAUDE, 0) == 1


def test_smart_select_complex_calls_are_answered_by_anthropic_streamed_and_not(stack: Stack) -> None:
    client = sdk(stack, stack.new_tenant_key("gateway"))
    raw = client.chat.completions.with_raw_response.create(
        model="smart-select", messages=[{"role": "user", "content": "Prove that the square root of 2 is irrational"}],
        metadata={"tier": "complex"})
    assert raw.headers["x-tierbatch-tier"] == "complex"
    completion = raw.parse()
    validate(json.loads(raw.content), "CreateChatCompletionResponse")
    assert completion.model.startswith("claude-haiku-4-5")
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    [row] = ledger(stack, raw.headers["x-tierbatch-task-id"])
    assert row["provider"] == "claude" and row["input_tokens"] == completion.usage.prompt_tokens
    assert row["output_tokens"] == completion.usage.completion_tokens

    with client.chat.completions.with_streaming_response.create(
            model="smart-select", messages=[{"role": "user", "content": "Explain step by step how TLS works"}],
            metadata={"tier": "complex"}, stream=True, stream_options={"include_usage": True}) as response:
        task_id = response.headers["x-tierbatch-task-id"]
        chunks = [json.loads(line[5:]) for line in response.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert text and len(usage) == 1

    def recorded() -> list[dict[str, Any]]:
        return ledger(stack, task_id)

    [row] = wait_until(recorded, 10, message="the stream's ledger row")
    assert row["provider"] == "claude" and row["usage_estimated"] is False
    assert (row["input_tokens"], row["output_tokens"]) == (usage[0]["prompt_tokens"], usage[0]["completion_tokens"])
    assert messages_calls(stack).get(CLAUDE, 0) == 2


@pytest.mark.parametrize("tier", ["light", "complex"])  # light: OpenAI kind; complex: Anthropic kind
def test_a_tool_call_round_trip_through_the_gateway(stack: Stack, tier: str) -> None:
    client = sdk(stack, stack.new_tenant_key(f"tools-{tier}"))
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.with_raw_response.create(
        model="smart-select", messages=question, tools=[WEATHER_TOOL], tool_choice="required",
        metadata={"tier": tier})
    asked = first.parse()
    assert asked.choices[0].finish_reason == "tool_calls"
    [call] = asked.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    validate_schema(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    second = client.chat.completions.with_raw_response.create(
        model="smart-select", tools=[WEATHER_TOOL], metadata={"tier": tier}, messages=[
            *question,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "unit": "celsius"}'}])
    answered = second.parse()
    assert answered.choices[0].finish_reason == "stop" and answered.choices[0].message.content
    provider = "claude" if tier == "complex" else "sim"
    for raw in (first, second):
        [row] = ledger(stack, raw.headers["x-tierbatch-task-id"])
        assert row["provider"] == provider and row["cost_usd"] > 0
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0


@pytest.mark.parametrize("tier", ["light", "complex"])
def test_a_tool_call_round_trip_through_tasks(stack: Stack, tier: str) -> None:
    with stack.client(stack.new_tenant_key(f"task-tools-{tier}")) as client:
        question = [{"role": "user", "content": "What is the weather in Oslo?"}]
        first = client.post("/v1/tasks", json={"messages": question, "tier": tier, "urgent": True,
                                               "params": {"tools": [WEATHER_TOOL], "tool_choice": "required"}})
        assert first.status_code == 202, first.text
        asked = stack.wait_for_task(client, first.json()["id"], {"succeeded", "failed"})
        assert asked["status"] == "succeeded", asked
        message = asked["response"]["choices"][0]["message"]
        [call] = message["tool_calls"]
        validate_schema(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
        second = client.post("/v1/tasks", json={"tier": tier, "urgent": True, "params": {"tools": [WEATHER_TOOL]},
                                                "messages": [*question, {"role": "assistant", "content": None,
                                                                         "tool_calls": [call]},
                                                             {"role": "tool", "tool_call_id": call["id"],
                                                              "content": "sunny, 21 degrees"}]})
        assert second.status_code == 202, second.text
        answered = stack.wait_for_task(client, second.json()["id"], {"succeeded", "failed"})
        assert answered["status"] == "succeeded" and answered["output"]
    provider = "claude" if tier == "complex" else "sim"
    for task in (asked, answered):
        [row] = ledger(stack, task["id"])
        assert row["provider"] == provider and row["cost_usd"] is not None and Decimal(row["cost_usd"]) > 0


def test_an_anthropic_model_that_fails_falls_back_to_an_openai_compatible_one(stack: Stack) -> None:
    stack.sim("POST", "/_sim/config", {"models": {CLAUDE: {"error_rate": 1.0, "error_status": 529}}})
    client = sdk(stack, stack.new_tenant_key("fallback"))
    raw = client.chat.completions.with_raw_response.create(
        model="smart-select", messages=[{"role": "user", "content": "Explain step by step"}],
        metadata={"tier": "complex"})
    assert raw.parse().model.startswith("gpt-4o")
    [row] = ledger(stack, raw.headers["x-tierbatch-task-id"])
    assert row["provider"] == "sim" and row["requested_model"] == "gpt-4o"
    assert messages_calls(stack).get(CLAUDE, 0) >= 1  # tried first, overloaded
