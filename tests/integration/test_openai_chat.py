"""The OpenAI-compatible front door, driven with the real `openai` SDK against the running API:
smart-select routing, named models, pass-through parameters, streaming, error shapes, fallbacks
with the shared cooldown (two API processes) and automatic recovery, `GET /v1/models`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI

from tests.integration.conftest import delete_redis_keys
from tests.support.openapi import validate
from tests.support.procs import free_port, python_module, wait_http_ok, wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration


_clients: list[OpenAI] = []


def sdk(stack: Stack, key: str, base_url: str | None = None) -> OpenAI:
    client = OpenAI(base_url=(base_url or stack.api_url) + "/v1", api_key=key, max_retries=0, timeout=30)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def clear_cooldowns(stack: Stack) -> None:
    delete_redis_keys(f"{stack.redis_prefix}tierbatch:cooldown:")


@pytest.fixture
def gw(sim_reset: Stack) -> Iterator[Stack]:
    """Simulator defaults and no model cooling down, before and after the test."""
    clear_cooldowns(sim_reset)
    yield sim_reset
    clear_cooldowns(sim_reset)


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def chat(client: OpenAI, **kwargs: Any) -> tuple[dict[str, Any], Any]:
    """One call; the raw JSON body (validated against OpenAI's schema) and the response headers."""
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    body = json.loads(raw.content)
    validate(body, "CreateChatCompletionResponse")
    raw.parse()  # the SDK can read it, too
    return body, raw.headers


def sim_calls(stack: Stack) -> dict[str, int]:
    calls: dict[str, int] = stack.sim("GET", "/_sim/stats")["chat_calls"]
    return calls


def test_smart_select_routes_by_hint_and_records_a_priced_task(gw: Stack) -> None:
    stack = gw
    key = stack.new_tenant_key("gateway")
    client = sdk(stack, key)
    light, light_headers = chat(client, model="smart-select", messages=[{"role": "user", "content": "Say hi"}],
                                metadata={"tier": "light"})
    heavy, heavy_headers = chat(client, model="smart-select",
                                messages=[{"role": "user", "content": "Say hi"}],
                                extra_headers={"X-Tier": "complex"})
    auto, auto_headers = chat(client, model="smart-select", messages=[
        {"role": "user", "content": "Explain step by step why the sky is blue."}])
    typed, typed_headers = chat(client, model="smart-select", messages=[
        {"role": "user", "content": "Explain step by step: is this ticket about billing?"}],
        extra_headers={"X-Task-Type": "classification"})

    assert light["model"] == "gpt-4o-mini" and light_headers["x-tierbatch-tier"] == "light"
    assert heavy["model"] == "gpt-4o" and heavy_headers["x-tierbatch-tier"] == "complex"
    assert auto["model"] == "gpt-4o" and auto_headers["x-tierbatch-tier"] == "complex"  # reasoning cue
    assert typed["model"] == "gpt-4o-mini" and typed_headers["x-tierbatch-tier"] == "light"  # [routing]

    with stack.client(key) as native:
        for body, headers in ((light, light_headers), (heavy, heavy_headers)):
            cost = Decimal(headers["x-tierbatch-cost-usd"])
            assert cost > 0
            task = native.get(f"/v1/tasks/{headers['x-tierbatch-task-id']}").json()
            assert task["status"] == "succeeded" and task["mode"] == "immediate"
            assert task["served_model"] == body["model"]
            assert Decimal(task["cost_usd"]) == cost
            assert task["usage"]["input_tokens"] == body["usage"]["prompt_tokens"]
            assert task["output"] == body["choices"][0]["message"]["content"]
    rows = query(stack, "SELECT served_model, cost_usd, usage_estimated, mode::text FROM ledger_entries "
                        "WHERE task_id = %s", light_headers["x-tierbatch-task-id"])
    assert rows == [("gpt-4o-mini", Decimal(light_headers["x-tierbatch-cost-usd"]), False, "immediate")]


def test_named_model_and_parameters_pass_through(gw: Stack) -> None:
    stack = gw
    client = sdk(stack, stack.new_tenant_key("named"))
    body, headers = chat(client, model="gpt-4.1-mini", messages=[{"role": "user", "content": "Say hi"}], n=2,
                         seed=7, stop=["\n\n"], temperature=0.2)
    assert body["model"] == "gpt-4.1-mini" and headers["x-tierbatch-tier"] == "light"
    assert len(body["choices"]) == 2  # n reached the provider
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": ["billing", "bug"]}},
              "required": ["label"], "additionalProperties": False}
    labelled, _ = chat(client, model="gpt-4o", messages=[{"role": "user", "content": "Route: refund please"}],
                       response_format={"type": "json_schema",
                                        "json_schema": {"name": "label", "strict": True, "schema": schema}},
                       tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
    assert json.loads(labelled["choices"][0]["message"]["content"])["label"] in ("billing", "bug")
    stored = query(stack, "SELECT request, tier::text, tier_reason FROM tasks WHERE id = %s",
                   headers["x-tierbatch-task-id"])
    request, tier, reason = stored[0]
    assert {k: request[k] for k in ("n", "seed", "stop", "temperature")} == {
        "n": 2, "seed": 7, "stop": ["\n\n"], "temperature": 0.2}
    assert "model" not in request and tier == "light" and "asked by name" in reason


def test_streaming_with_and_without_usage(gw: Stack) -> None:
    stack = gw
    key = stack.new_tenant_key("stream")
    client = sdk(stack, key)
    for include_usage in (False, True):
        options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        with client.chat.completions.with_streaming_response.create(
                model="smart-select", messages=[{"role": "user", "content": "Tell me a short story about a cat"}],
                stream=True, metadata={"tier": "light"}, **options) as response:
            task_id = response.headers["x-tierbatch-task-id"]
            assert response.headers["x-tierbatch-tier"] == "light"
            chunks = [json.loads(line[5:]) for line in response.iter_lines()
                      if line.startswith("data:") and line != "data: [DONE]"]
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text and all(c["model"] == "gpt-4o-mini" for c in chunks)
        usage_chunks = [c for c in chunks if c.get("usage")]
        if include_usage:
            assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
        else:
            assert usage_chunks == []

        def recorded(task: str = task_id) -> list[tuple[Any, ...]]:
            return query(stack, "SELECT t.status::text, t.output, l.input_tokens, l.output_tokens, l.usage_estimated "
                                "FROM tasks t JOIN ledger_entries l ON l.task_id = t.id WHERE t.id = %s", task)

        rows = wait_until(recorded, 10, message="the stream's ledger row")
        assert isinstance(rows, list)
        status, output, input_tokens, output_tokens, estimated = rows[0]
        assert status == "succeeded" and output == text and estimated is False
        if include_usage:
            assert (input_tokens, output_tokens) == (usage_chunks[0]["usage"]["prompt_tokens"],
                                                     usage_chunks[0]["usage"]["completion_tokens"])
        assert input_tokens > 0 and output_tokens > 0

    # the SDK's own stream reader works on the same endpoint
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_bad_requests_answer_openai_errors_and_store_nothing(gw: Stack) -> None:
    stack = gw
    key = stack.new_tenant_key("bad")
    client = sdk(stack, key)
    cases: list[tuple[dict[str, Any], type[openai.APIStatusError], int, str | None]] = [
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, openai.NotFoundError, 404,
         "model_not_found"),
        ({"model": "smart-select", "messages": openai.NOT_GIVEN}, openai.BadRequestError, 400,
         "missing_required_parameter"),
        ({"model": "smart-select", "messages": []}, openai.BadRequestError, 400, "empty_array"),
        ({"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], "extra_body": {"frobnicate": 1}},
         openai.BadRequestError, 400, "unknown_parameter"),
        ({"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
         openai.BadRequestError, 400, "invalid_value"),
        ({"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], "metadata": {"tier": "huge"}},
         openai.BadRequestError, 400, "invalid_value"),
    ]
    for kwargs, error_type, status, code in cases:
        with pytest.raises(error_type) as caught:
            client.chat.completions.create(**kwargs)
        assert caught.value.status_code == status, kwargs
        body = caught.value.response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["code"] == code, body
    assert isinstance(caught.value, openai.BadRequestError)
    assert caught.value.response.json()["error"]["param"] == "metadata.tier"

    with pytest.raises(openai.AuthenticationError) as denied:
        sdk(stack, "tb_not-a-key").chat.completions.create(model="smart-select",
                                                           messages=[{"role": "user", "content": "hi"}])
    validate(denied.value.response.json(), "ErrorResponse")
    not_json = httpx.post(f"{stack.api_url}/v1/chat/completions", content=b"{oops",
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert not_json.status_code == 400
    validate(not_json.json(), "ErrorResponse")

    with stack.client(key) as native:
        assert native.get("/v1/tasks").json()["data"] == []
    assert sim_calls(stack) == {}


def test_provider_errors_keep_their_status_and_retry_after(gw: Stack) -> None:
    stack = gw
    client = sdk(stack, stack.new_tenant_key("upstream"))
    light_chain = ("gpt-4o-mini", "gpt-4.1-mini")
    stack.sim("POST", "/_sim/config", {"models": {m: {"error_rate": 1.0, "error_status": 429,
                                                      "retry_after_seconds": 7} for m in light_chain}})
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "7"
    validate(limited.value.response.json(), "ErrorResponse")
    # each model was asked once: a 429 moves down the chain at once (and cools the model down)
    assert sim_calls(stack) == {"gpt-4o-mini": 1, "gpt-4.1-mini": 1}
    clear_cooldowns(stack)

    stack.sim("POST", "/_sim/config", {"models": {m: {"error_status": 400} for m in light_chain}})
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    validate(refused.value.response.json(), "ErrorResponse")
    # a failed call is a failed task, without a ledger row (no provider answer to bill)
    for error in (limited.value, refused.value):
        task_id = error.response.headers["x-tierbatch-task-id"]
        rows = query(stack, "SELECT t.status::text, t.error IS NOT NULL, count(l.id) FROM tasks t "
                            "LEFT JOIN ledger_entries l ON l.task_id = t.id WHERE t.id = %s GROUP BY t.id", task_id)
        assert rows == [("failed", True, 0)]


def test_fallback_cooldown_shared_across_api_processes_and_recovery(gw: Stack) -> None:
    stack = gw
    key = stack.new_tenant_key("cooldown")
    first = sdk(stack, key)
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 1.0, "error_status": 500}}})
    served = [chat(first, model="smart-select", messages=[{"role": "user", "content": f"hello {i}"}],
                   metadata={"tier": "complex"})[0]["model"] for i in range(8)]
    assert served == ["gpt-4.1"] * 8  # every call succeeded on the fallback
    calls = sim_calls(stack)
    # retries_per_model = 1: the first call tries gpt-4o twice, the second once more (the third failure
    # trips it), then nobody asks it again while it cools down
    assert calls["gpt-4o"] == 3, calls
    assert calls["gpt-4.1"] == 8

    # another API process shares the cooldown through Redis
    port = free_port()
    second_proc = stack._start("api-second",
                               python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)))
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=second_proc)
        second = sdk(stack, key, f"http://127.0.0.1:{port}")
        body, _ = chat(second, model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert body["model"] == "gpt-4.1"
        assert sim_calls(stack)["gpt-4o"] == 3
    finally:
        second_proc.stop()

    # recovery: once gpt-4o answers again, the probe after the cooldown closes the circuit by itself
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 0.0}}})
    started = time.monotonic()

    def back_on_primary() -> bool:
        return chat(first, model="gpt-4o", messages=[{"role": "user", "content": "hi"}])[0]["model"] == "gpt-4o"

    wait_until(back_on_primary, 30, interval=0.5, message="gpt-4o serving again")
    assert time.monotonic() - started < 15
    assert [chat(first, model="gpt-4o", messages=[{"role": "user", "content": "hi"}])[0]["model"]
            for _ in range(3)] == ["gpt-4o"] * 3


def test_models_lists_smart_select_and_configured_models(gw: Stack) -> None:
    stack = gw
    client = sdk(stack, stack.new_tenant_key("models"))
    raw = client.models.with_raw_response.list()
    body = json.loads(raw.content)
    validate(body, "ListModelsResponse")
    for model in body["data"]:
        validate(model, "Model")
    assert [m["id"] for m in body["data"]] == ["smart-select", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4o", "gpt-4.1"]
    assert client.models.retrieve("smart-select").id == "smart-select"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    validate(missing.value.response.json(), "ErrorResponse")
