"""The simulator as a real process, reached through the `openai` SDK: chat, models, faults, keys."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.integration.test_simulator_process import Sim, start
from tests.support.openapi import validate
from tierbatch.simulator.answers import input_key, reference_label

pytestmark = pytest.mark.integration

CONFIG = """
[batch]
validating_seconds = 0.1
in_progress_seconds = 0.1
finalizing_seconds = 0.1
[models."*"]
latency_ms = [0, 0]
agreement = 0.95
[models."gpt-4o"]
reference = true
served_as = "gpt-4o-2024-08-06"
"""
LABELS = ["billing", "account", "bug"]


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


def classify_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "route", "strict": True, "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
        "required": ["label"], "additionalProperties": False}}}


def msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Route the support ticket."}, {"role": "user", "content": text}]


def test_models(sim: Sim) -> None:
    listed = sim.http.get("/v1/models").json()
    validate(listed, "ListModelsResponse")
    ids = [m["id"] for m in listed["data"]]
    assert "gpt-4o" in ids and "gpt-4o-2024-08-06" in ids
    one = sim.client.models.retrieve("any-model/with-slash")
    assert one.id == "any-model/with-slash"
    validate(one.model_dump(exclude_unset=True), "Model")


def test_classification_by_schema_is_deterministic(sim: Sim) -> None:
    messages = msgs("Ticket: I was charged twice this month")
    reference = reference_label(tuple(LABELS), input_key(messages))
    raw = sim.client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, response_format=classify_format())
    body = json.loads(raw.text)
    validate(body, "CreateChatCompletionResponse")
    assert body["model"] == "gpt-4o-2024-08-06"  # the served snapshot
    assert json.loads(body["choices"][0]["message"]["content"]) == {"label": reference}
    again = sim.client.chat.completions.create(model="gpt-4o", messages=messages,
                                               response_format=classify_format())
    assert again.choices[0].message.content == body["choices"][0]["message"]["content"]
    light = sim.client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                               response_format=classify_format())
    assert light.model == "gpt-4o-mini"  # asked name when no snapshot is configured
    assert json.loads(light.choices[0].message.content or "")["label"] in LABELS


def test_labels_line_and_agreement(sim: Sim) -> None:
    sim.configure({"models": {"agree-70": {"agreement": 0.7}, "agree-0": {"agreement": 0.0}}})
    inputs = [msgs(f"Ticket {i}: something about my account\nLabels: billing, account, bug") for i in range(120)]
    same = {"agree-70": 0, "agree-0": 0}
    for messages in inputs:
        reference = sim.client.chat.completions.create(model="gpt-4o", messages=messages)
        assert reference.choices[0].message.content == reference_label(tuple(LABELS), input_key(messages))
        for model in same:
            answer = sim.client.chat.completions.create(model=model, messages=messages)
            assert answer.choices[0].message.content in LABELS
            same[model] += answer.choices[0].message.content == reference.choices[0].message.content
    assert same["agree-0"] == 0
    assert 0.55 < same["agree-70"] / len(inputs) < 0.85
    assert sim.stats()["chat_calls"] == {"gpt-4o": 120, "agree-70": 120, "agree-0": 120}


def test_cached_tokens(sim: Sim) -> None:
    system = "You are a careful assistant. " * 172  # 4,988 characters: 1,247 tokens
    first = [{"role": "system", "content": system}, {"role": "user", "content": "A: first question"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "B: second question"}]
    usage = []
    for messages in (first, first, second):
        raw = sim.client.chat.completions.with_raw_response.create(model="cache-model", messages=messages)
        body = json.loads(raw.text)
        validate(body, "CreateChatCompletionResponse")
        usage.append(body["usage"])
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] == 1152
    assert usage[2]["prompt_tokens_details"]["cached_tokens"] == 1152  # shared prefix: 4,989 chars
    assert usage[0]["prompt_tokens"] == -(-(len(system) + 1 + len("A: first question")) // 4)
    for u in usage:
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["completion_tokens_details"]["reasoning_tokens"] == 0
    # another model has its own cache; a reset forgets everything
    other = sim.client.chat.completions.create(model="other-model", messages=first)
    assert other.usage is not None and other.usage.prompt_tokens_details is not None
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    sim.http.post("/_sim/reset")
    again = sim.client.chat.completions.create(model="cache-model", messages=first)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_text_truncation_n_and_reasoning(sim: Sim) -> None:
    sim.configure({"models": {"thinker": {"reasoning_tokens": 100}}})
    full = sim.client.chat.completions.create(model="thinker", messages=msgs("Summarise the report."))
    assert full.choices[0].finish_reason == "stop"
    assert full.usage is not None and full.usage.completion_tokens_details is not None
    assert full.usage.completion_tokens_details.reasoning_tokens == 100
    cut = sim.client.chat.completions.create(model="plain", messages=msgs("Summarise the report."), max_tokens=4)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 4
    many = sim.client.chat.completions.create(model="plain", messages=msgs("Say it."), n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_streaming(sim: Sim) -> None:
    messages = msgs("Explain the outage.")
    whole = sim.client.chat.completions.create(model="gpt-4o", messages=messages)
    chunks = []
    with sim.http.stream("POST", "/v1/chat/completions", json={
        "model": "gpt-4o", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: "):])
        validate(chunk, "CreateChatCompletionStreamResponse")
        chunks.append(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    # through the SDK too
    stream = sim.client.chat.completions.create(model="gpt-4o", messages=messages,
                                                stream=True, stream_options={"include_usage": True})
    with stream:
        parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].model == "gpt-4o-2024-08-06"


def test_rate_limit_with_retry_after(sim: Sim) -> None:
    sim.configure({"models": {"limited": {"error_rate": 1.0, "error_status": 429, "retry_after_seconds": 2.5}}})
    with pytest.raises(openai.RateLimitError) as info:
        sim.client.chat.completions.create(model="limited", messages=msgs("hi"))
    response = info.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2.5"
    assert response.headers["retry-after-ms"] == "2500"
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    stats = sim.stats()
    assert stats["chat_calls"]["limited"] == 1 and stats["chat_errors"]["limited"] == 1


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(sim: Sim, status: int) -> None:
    sim.configure({"models": {"broken": {"error_rate": 1.0, "error_status": status}}})
    with pytest.raises(openai.APIStatusError) as info:
        sim.client.chat.completions.create(model="broken", messages=msgs("hi"))
    assert info.value.status_code == status
    assert isinstance(info.value, openai.InternalServerError)
    validate(info.value.response.json(), "ErrorResponse")
    assert info.value.response.json()["error"]["type"] == "server_error"
    # a partial error rate fails some calls and not others
    sim.configure({"models": {"broken": {"error_rate": 0.5}}})
    outcomes = set()
    for _ in range(40):
        try:
            sim.client.chat.completions.create(model="broken", messages=msgs("hi"))
            outcomes.add("ok")
        except openai.APIStatusError as exc:
            outcomes.add(exc.status_code)
    assert outcomes == {"ok", status}
    assert sim.stats()["chat_calls"]["broken"] == 41


def test_latency_and_slow_responses(sim: Sim) -> None:
    sim.configure({"models": {"steady": {"latency_ms": [200, 200]}, "sluggish": {"slow_rate": 1.0,
                                                                                 "slow_ms": 3000}}})
    started = time.monotonic()
    sim.client.chat.completions.create(model="steady", messages=msgs("hi"))
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        sim.client.chat.completions.create(model="sluggish", messages=msgs("hi"), timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert sim.stats()["chat_slow"] == {"sluggish": 1}


@pytest.mark.parametrize(("payload", "param", "code"), [
    ({"messages": [{"role": "user", "content": "x"}]}, None, None),
    ({"model": "m"}, "messages", "missing_required_parameter"),
    ({"model": "m", "messages": "hello"}, "messages", "invalid_type"),
    ({"model": "m", "messages": []}, "messages", "empty_array"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "integer_below_min_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens",
     "invalid_type"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type", "invalid_value"),
    ([1, 2], None, "invalid_type"),
])
def test_bad_requests(sim: Sim, payload: Any, param: str | None, code: str | None) -> None:
    response = sim.http.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == "invalid_request_error"
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)


def test_malformed_json_and_unknown_routes(sim: Sim) -> None:
    response = sim.http.post("/v1/chat/completions", content=b"{not json",
                             headers={"content-type": "application/json"})
    assert response.status_code == 400
    validate(response.json(), "ErrorResponse")
    assert "parse the JSON body" in response.json()["error"]["message"]
    missing = sim.http.get("/v1/nothing-here")
    assert missing.status_code == 404
    validate(missing.json(), "ErrorResponse")
    with pytest.raises(openai.BadRequestError):
        sim.client.chat.completions.create(model="m", messages=[])


def test_sim_config_endpoint(sim: Sim) -> None:
    merged = sim.configure({"batch": {"expire": True}, "models": {"x": {"agreement": 0.25}}})
    assert merged["batch"]["expire"] is True
    assert merged["batch"]["validating_seconds"] == 0.1  # from the file, kept
    assert merged["models"]["x"] == {"agreement": 0.25}
    assert merged["models"]["gpt-4o"]["reference"] is True
    for bad in ({"models": {"x": {"agreement": 3}}}, {"nope": True}, {"batch": {"expire": "sometimes"}}, [1]):
        response = sim.http.post("/_sim/config", json=bad)
        assert response.status_code == 400, bad
        validate(response.json(), "ErrorResponse")
    assert sim.http.post("/_sim/config", content=b"{", headers={"content-type": "application/json"}
                         ).status_code == 400
    assert sim.http.get("/_sim/config").json() == merged  # bad patches changed nothing


def test_stats_and_reset(sim: Sim) -> None:
    sim.configure({"models": {"failing": {"error_rate": 1.0}}})
    for model in ("a", "a", "failing"):
        with contextlib.suppress(openai.InternalServerError):
            sim.client.chat.completions.create(model=model, messages=msgs("hi"))
    sim.http.post("/v1/chat/completions", json={"model": "b"})  # invalid, still counted for its model
    stats = sim.stats()
    assert stats["chat_calls"] == {"a": 2, "failing": 1, "b": 1}
    assert stats["chat_errors"] == {"failing": 1}
    for key in ("files_created", "batches_created", "batch_lines"):
        assert stats[key] == 0
    sim.http.post("/_sim/reset")
    assert sim.stats()["chat_calls"] == {}


def test_api_key_required(tmp_path: Path) -> None:
    with start(tmp_path, 'api_key = "sk-sim-secret"\n[models."*"]\nlatency_ms = [0, 0]\n') as sim:
        no_key = sim.http.post("/v1/chat/completions", json={"model": "m", "messages": msgs("hi")})
        assert no_key.status_code == 401
        validate(no_key.json(), "ErrorResponse")
        assert sim.http.get("/v1/models").status_code == 401
        wrong = OpenAI(base_url=f"{sim.base}/v1", api_key="sk-wrong", max_retries=0)
        right = OpenAI(base_url=f"{sim.base}/v1", api_key="sk-sim-secret", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError) as info:
                wrong.chat.completions.create(model="m", messages=msgs("hi"))
            assert info.value.response.json()["error"]["code"] == "invalid_api_key"
            ok = right.chat.completions.create(model="m", messages=msgs("hi"))
            assert ok.choices[0].message.content
            assert right.models.list().data
        finally:
            wrong.close()
            right.close()
        assert sim.http.get("/_sim/stats").status_code == 200  # /_sim/* needs no key
        assert sim.stats()["chat_calls"] == {"m": 1}  # rejected calls never reached the model
