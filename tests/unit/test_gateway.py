"""The front door's pure parts: request checks, routing, error mapping, the fallback loop with the
cooldown, and the stream relay's bookkeeping (exact usage, or an estimate when the client leaves)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx2
import psycopg
import pytest

from tests.unit.test_cooldown import FakeRedis
from tierbatch.api.errors import response_for, status_of
from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.errors import (
    BudgetExceeded,
    ChainExhausted,
    PermanentProviderError,
    RecordingFailed,
    Refused,
    RetryableProviderError,
    TierbatchError,
)
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.gateway.call import Gateway
from tierbatch.gateway.recorder import CallRecord, Recorder, record_params
from tierbatch.gateway.routing import (
    SMART_SELECT,
    listed_models,
    prepare_chat_call,
    provider_request,
    route_request,
)
from tierbatch.gateway.validation import validate_chat_body
from tierbatch.ledger.pricing import PriceBook
from tierbatch.providers.adapter import RawChatAnswer
from tierbatch.providers.client import AsyncProviderClients
from tierbatch.providers.cooldown import Cooldown, CooldownPolicy

CONFIG = parse_config(default_config_data(), environ={})
HI = [{"role": "user", "content": "hi"}]


def error_of(body: Any) -> Refused:
    with pytest.raises(Refused) as caught:
        validate_chat_body(body)
    return caught.value


def openai_answer(exc: TierbatchError) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    """Status, error body and headers the API answers for `exc` on the OpenAI surface."""
    response = response_for(exc, openai=True)
    return response.status_code, dict(json.loads(bytes(response.body))["error"]), response.headers


def openai_body(exc: TierbatchError) -> dict[str, Any]:
    return openai_answer(exc)[1]


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ([], 400, None, "invalid_type"),
    ({"messages": HI}, 400, "model", "missing_required_parameter"),
    ({"model": "smart-select"}, 400, "messages", "missing_required_parameter"),
    ({"model": "smart-select", "messages": []}, 400, "messages", "empty_array"),
    ({"model": "smart-select", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ({"model": "smart-select", "messages": [{"role": "user"}]}, 400, "messages[0].content",
     "missing_required_parameter"),
    ({"model": "smart-select", "messages": HI, "n": 0}, 400, "n", "invalid_value"),
    ({"model": "smart-select", "messages": HI, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": "smart-select", "messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "invalid_value"),
    ({"model": "smart-select", "messages": HI, "response_format": {"type": "xml"}}, 400, "response_format.type",
     "invalid_value"),
    ({"model": "smart-select", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"model": "smart-select", "messages": HI, "metadata": {"tier": 1}}, 400, "metadata.tier", "invalid_type"),
    ({"model": "smart-select", "messages": HI, "wibble": True}, 400, "wibble", "unknown_parameter"),
])
def test_bad_requests_are_refused_like_openai(body: Any, status: int, param: str | None, code: str) -> None:
    error = error_of(body)
    assert (status_of(error), error.param, error.code) == (status, param, code)
    body = openai_body(error)
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, code)


def test_every_openai_request_field_passes() -> None:
    body = {"model": "smart-select", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"}, "n": 2, "seed": 3, "stop": "\n",
            "logprobs": True, "top_logprobs": 2, "user": "u", "parallel_tool_calls": False,
            "reasoning_effort": "low", "service_tier": "auto", "stream": True,
            "stream_options": {"include_usage": True}}
    assert validate_chat_body(body) is body


def test_smart_select_routes_by_hint_config_and_heuristic() -> None:
    def tier_of(messages: Sequence[Mapping[str, Any]], hint: str | None = None, task_type: str | None = None) -> Tier:
        return route_request(CONFIG, SMART_SELECT, messages, tier_hint=hint, task_type_hint=task_type,
                             tools_requested=False).tier

    assert tier_of(HI) is Tier.LIGHT
    assert tier_of(HI, "complex") is Tier.COMPLEX
    assert tier_of([{"role": "user", "content": "Explain step by step"}]) is Tier.COMPLEX
    assert tier_of([{"role": "user", "content": "Explain step by step"}], task_type="classification") is Tier.LIGHT
    assert tier_of([{"role": "user", "content": "Explain step by step"}], "light", "reasoning") is Tier.LIGHT
    route = route_request(CONFIG, SMART_SELECT, HI, tier_hint="AUTO", task_type_hint=None, tools_requested=True)
    assert route.tier is Tier.COMPLEX and route.requested_tier is RequestedTier.AUTO
    assert route.chain == CONFIG.tiers["complex"].chain


def test_a_named_model_keeps_its_own_fallbacks() -> None:
    primary = route_request(CONFIG, "gpt-4o-mini", HI, tier_hint="complex", task_type_hint=None,
                            tools_requested=False)
    assert primary.tier is Tier.LIGHT and [r.model for r in primary.chain] == ["gpt-4o-mini", "gpt-4.1-mini"]
    fallback = route_request(CONFIG, "gpt-4.1-mini", HI, tier_hint=None, task_type_hint=None, tools_requested=False)
    assert fallback.tier is Tier.LIGHT and [r.model for r in fallback.chain] == ["gpt-4.1-mini"]
    with pytest.raises(Refused) as missing:
        route_request(CONFIG, "gpt-9", HI, tier_hint=None, task_type_hint=None, tools_requested=False)
    assert (status_of(missing.value), missing.value.code) == (404, "model_not_found")
    with pytest.raises(Refused) as bad_tier:
        route_request(CONFIG, SMART_SELECT, HI, tier_hint="medium", task_type_hint=None, tools_requested=False,
                      tier_param="X-Tier")
    assert bad_tier.value.param == "X-Tier"


def test_prepared_call_reads_headers_and_keeps_metadata_off_the_provider_request() -> None:
    call = prepare_chat_call(CONFIG, {"model": SMART_SELECT, "messages": HI, "stream": True,
                                      "stream_options": {"include_usage": True},
                                      "metadata": {"task_type": "reasoning", "team": "a"}},
                             {"x-tier": "light"})
    assert call.stream and call.include_usage
    assert call.route.tier is Tier.LIGHT and call.route.task_type == "reasoning"
    # metadata is ours (routing, and the tenant's keys on the task): a provider keeps it only with `store`
    assert call.request == {"messages": HI}
    assert call.metadata == {"task_type": "reasoning", "team": "a"}
    assert provider_request({"model": "m", "messages": HI, "metadata": {"tier": "light"}}) == {"messages": HI}
    assert provider_request({"model": "m", "messages": HI, "web_search_options": None, "audio": None,
                             "temperature": None}) == {"messages": HI, "temperature": None}


def test_models_list_smart_select_first_then_each_configured_model_once() -> None:
    assert [m["id"] for m in listed_models(CONFIG)] == ["smart-select", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4o",
                                                        "gpt-4.1"]


def retryable(status: int | None, retry_after: float | None = None, message: str = "boom", *,
              timed_out: bool = False) -> RetryableProviderError:
    return RetryableProviderError(message, status_code=status, provider="sim", model="m", retry_after=retry_after,
                                  timed_out=timed_out)


def test_errors_map_to_openai_statuses() -> None:
    status, body, headers = openai_answer(ChainExhausted([retryable(429, 7), retryable(429, 3)]))
    assert (status, body["code"], headers["retry-after"]) == (429, "rate_limit_exceeded", "3")
    status, body, _ = openai_answer(ChainExhausted([PermanentProviderError("sim/m: HTTP 400: bad", status_code=400)]))
    assert (status, body["type"]) == (400, "invalid_request_error")
    status, _, _ = openai_answer(ChainExhausted([PermanentProviderError("sim/m: HTTP 401: key", status_code=401)]))
    assert status == 502  # our provider account's problem, not the client's key
    assert openai_answer(ChainExhausted([retryable(429, 1), retryable(503)]))[0] == 503
    # a timeout is told by the error's type (set where the SDK's error is mapped), never by its wording
    timed_out = retryable(None, message="sim/m: request timed out", timed_out=True)
    assert openai_answer(ChainExhausted([timed_out]))[0] == 504
    assert openai_answer(ChainExhausted([retryable(None, message="sim/m: request timed out")]))[0] == 502
    status, body, headers = openai_answer(ChainExhausted([], cooling_retry_after=2.5))
    assert (status, body["code"], headers["retry-after"]) == (503, "model_cooling_down", "3")
    assert "x-tierbatch-task-id" not in headers
    named = uuid.uuid4()
    assert openai_answer(ChainExhausted([retryable(503)], task_id=named))[2]["x-tierbatch-task-id"] == str(named)


# --- the fallback loop --------------------------------------------------------------------------------


class FakeProviders:
    def __init__(self, failures: dict[str, list[Exception]]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    async def chat(self, provider: str, model: str, request: Mapping[str, Any], *,
                   cache_key: str | None = None) -> RawChatAnswer:
        self.calls.append(model)
        queue = self.failures.get(model) or []
        if queue:
            raise queue.pop(0)
        body = {"id": "x", "object": "chat.completion", "created": 1, "model": model + "-2024",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
        return RawChatAnswer(provider, model, json.dumps(body).encode(), body, 1)


class Recorded:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    async def record(self, record: CallRecord) -> None:
        self.records.append(record)

    async def aclose(self) -> None:
        return None


def gateway_with(providers: Any) -> tuple[Gateway, Recorded, FakeRedis]:
    fake = FakeRedis()
    cooldown = Cooldown(fake, "t:", CooldownPolicy(failure_threshold=2))  # type: ignore[arg-type]
    recorded = Recorded()
    gateway = Gateway(CONFIG, providers, cooldown, PriceBook(CONFIG), recorded)  # type: ignore[arg-type]
    return gateway, recorded, fake


def test_calls_fall_back_and_a_failing_model_is_cooled_down() -> None:
    providers = FakeProviders({"gpt-4o": [retryable(500) for _ in range(10)]})
    gateway, recorded, _ = gateway_with(providers)
    call = prepare_chat_call(CONFIG, {"model": "gpt-4o", "messages": HI}, {})

    async def run() -> list[str]:
        return [(await gateway.complete(uuid.uuid4(), call)).served_model for _ in range(4)]

    assert asyncio.run(run()) == ["gpt-4.1-2024"] * 4
    # default retries_per_model = 2: three tries on the first call trip it (threshold 2 here: after two)
    assert providers.calls.count("gpt-4o") == 2
    assert [r.status for r in recorded.records] == ["succeeded"] * 4
    first = recorded.records[0]
    assert first.attempts == 3 and first.served_model == "gpt-4.1-2024" and first.cost_usd is not None


def test_a_chain_that_fails_is_recorded_as_a_failed_task_and_answered_in_openai_shape() -> None:
    providers = FakeProviders({"gpt-4o": [PermanentProviderError("sim/gpt-4o: HTTP 400: nope", status_code=400)],
                               "gpt-4.1": [PermanentProviderError("sim/gpt-4.1: HTTP 400: nope", status_code=400)]})
    gateway, recorded, _ = gateway_with(providers)
    call = prepare_chat_call(CONFIG, {"model": "gpt-4o", "messages": HI}, {})
    with pytest.raises(ChainExhausted) as caught:
        asyncio.run(gateway.complete(uuid.uuid4(), call))
    status, _, headers = openai_answer(caught.value)
    assert status == 400
    assert headers["x-tierbatch-task-id"] == str(recorded.records[0].task_id)
    assert recorded.records[0].status == "failed" and recorded.records[0].usage is None


# --- streaming ----------------------------------------------------------------------------------------


def sse(chunk: dict[str, Any]) -> str:
    return "data: " + json.dumps(chunk)


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None,
          choices: bool = True) -> str:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini-x",
                            "choices": [], "usage": usage}
    if choices:
        body["choices"] = [{"index": 0, "delta": {"content": content} if content is not None else {},
                            "finish_reason": finish}]
    return sse(body)


class FakeStream:
    def __init__(self, lines: list[str], stall: bool = False) -> None:
        self.provider = "sim"
        self.requested_model = "gpt-4o-mini"
        self._lines = lines
        self._stall = stall
        self.closed = False

    async def lines(self) -> AsyncIterator[str]:
        for line in self._lines:
            yield line
            yield ""
        if self._stall:
            await asyncio.Event().wait()  # the provider stops sending

    async def aclose(self) -> None:
        self.closed = True


class StreamingProviders:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    async def open_stream(self, provider: str, model: str, request: Mapping[str, Any], *,
                          cache_key: str | None = None) -> FakeStream:
        assert request["stream_options"] == {"include_usage": True}  # always asked, for exact tokens
        return self.stream


def open_session(stream: FakeStream, include_usage: bool) -> tuple[Any, Recorded]:
    gateway, recorded, _ = gateway_with(StreamingProviders(stream))
    body: dict[str, Any] = {"model": SMART_SELECT, "messages": [{"role": "user", "content": "tell me a story"}],
                            "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    call = prepare_chat_call(CONFIG, body, {})
    session = asyncio.run(gateway.open_stream(uuid.uuid4(), call))
    return session, recorded


def test_a_finished_stream_is_recorded_with_the_providers_usage_and_hides_it_unless_asked() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3}
    lines = [chunk("Once "), chunk("upon"), chunk(finish="stop"), chunk(usage=usage, choices=False), "data: [DONE]"]
    for include_usage in (False, True):
        session, recorded = open_session(FakeStream(lines), include_usage)

        async def drain(events: AsyncIterator[bytes]) -> list[bytes]:
            return [event async for event in events]

        sent = asyncio.run(drain(session.events()))
        assert len(sent) == (5 if include_usage else 4)
        assert sent[-1] == b"data: [DONE]\n\n"
        record = recorded.records[0]
        assert record.status == "succeeded" and record.output == "Once upon" and not record.usage_estimated
        assert record.usage is not None and (record.usage.input_tokens, record.usage.output_tokens) == (12, 3)
        assert record.served_model == "gpt-4o-mini-x"
        assert json.loads(record.response_json or "{}")["choices"][0]["message"]["content"] == "Once upon"


def test_a_finished_stream_without_a_usage_chunk_is_billed_on_a_flagged_estimate() -> None:
    """A server that ignores `stream_options.include_usage` (not every OpenAI-compatible one sends usage)."""
    lines = [chunk("Once "), chunk("upon"), chunk(finish="stop"), "data: [DONE]"]
    session, recorded = open_session(FakeStream(lines), include_usage=True)

    async def drain(events: AsyncIterator[bytes]) -> list[bytes]:
        return [event async for event in events]

    assert asyncio.run(drain(session.events()))[-1] == b"data: [DONE]\n\n"
    record = recorded.records[0]
    assert record.status == "succeeded" and record.output == "Once upon" and record.usage_estimated is True
    assert record.usage is not None and record.usage.input_tokens > 0 and record.usage.output_tokens > 0
    assert record.cost_usd is not None


def test_a_client_leaving_midway_still_records_the_call_with_an_estimate() -> None:
    stream = FakeStream([chunk("Once upon a time there was a cat")], stall=True)
    session, recorded = open_session(stream, include_usage=True)

    async def leave_after_first_event() -> bytes:
        events = session.events()
        first = await events.__anext__()
        await events.aclose()  # what the response does when the client disconnects
        return first

    assert asyncio.run(leave_after_first_event()).startswith(b"data: ")
    record = recorded.records[0]
    assert stream.closed
    assert record.status == "failed" and record.usage_estimated is True
    assert record.error == "the client closed the stream before its end"
    assert record.usage is not None and record.usage.input_tokens > 0 and record.usage.output_tokens == 8
    assert record.cost_usd is not None  # an estimate is priced, and flagged as such


def test_budget_policy_on_the_gateway_route() -> None:
    """Over budget: `reject` is a 402 in OpenAI's shape; `downgrade` serves complex on the light chain."""
    from tierbatch.base.states import RequestedTier, Tier
    from tierbatch.gateway.policies import TenantPolicy
    from tierbatch.gateway.routing import Route, apply_budget_policy

    config = parse_config(default_config_data())
    route = Route(Tier.COMPLEX, RequestedTier.AUTO, "smart-select: auto: code in prompt", "general",
                  config.tier(Tier.COMPLEX).chain)
    assert apply_budget_policy(config, route, TenantPolicy({})) == route
    downgraded = apply_budget_policy(config, route, TenantPolicy({}, budget_downgrade="budget: reached"))
    assert downgraded.tier is Tier.LIGHT and downgraded.chain == config.tier(Tier.LIGHT).chain
    assert downgraded.reason == "budget: reached (was: smart-select: auto: code in prompt)"
    light = Route(Tier.LIGHT, RequestedTier.AUTO, "x", "general", config.tier(Tier.LIGHT).chain)
    assert apply_budget_policy(config, light, TenantPolicy({}, budget_downgrade="budget: reached")) == light
    with pytest.raises(BudgetExceeded) as refused:
        apply_budget_policy(config, route, TenantPolicy({}, budget_refusal="spent $1 of $1"))
    status, body, _ = openai_answer(refused.value)
    assert (status, body["type"], body["code"]) == (402, "insufficient_quota", "budget_exceeded")


# --- fail closed: no answer without its committed record ----------------------------------------------


def completion_body(content: str = "the secret answer") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4}}


def stream_body(include_usage: bool = True) -> bytes:
    pieces = [chunk("the secret "), chunk("answer"), chunk(finish="stop")]
    if include_usage:
        pieces.append(chunk(usage={"prompt_tokens": 10, "completion_tokens": 4}, choices=False))
    pieces.append("data: [DONE]")
    return "".join(p + "\n\n" for p in pieces).encode()


class Provider:
    """The provider behind `httpx2.MockTransport`: counts calls, answers a completion or a stream."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        if body.get("stream"):
            return httpx2.Response(200, content=stream_body(), headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=completion_body())


class Writes:
    """A record writer: commits (keeps) groups, or fails like a database that is down."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.committed: list[CallRecord] = []

    async def __call__(self, records: Sequence[CallRecord]) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise psycopg.OperationalError("connection refused")
        self.committed.extend(records)


def wired_gateway(fail: bool) -> tuple[Gateway, Provider, Writes]:
    provider, writes = Provider(), Writes(fail)
    providers = AsyncProviderClients(CONFIG, transport=httpx2.MockTransport(provider))
    cooldown = Cooldown(FakeRedis(), "t:", CooldownPolicy())  # type: ignore[arg-type]
    gateway = Gateway(CONFIG, providers, cooldown, PriceBook(CONFIG), Recorder(writes))
    return gateway, provider, writes


def test_an_answer_whose_record_fails_is_withheld() -> None:
    gateway, provider, writes = wired_gateway(fail=True)
    call = prepare_chat_call(CONFIG, {"model": "gpt-4o-mini", "messages": HI}, {})
    with pytest.raises(RecordingFailed) as caught:
        asyncio.run(gateway.complete(uuid.uuid4(), call))
    status, body, headers = openai_answer(caught.value)
    assert (status, body["type"], body["code"], headers["retry-after"]) == (
        503, "server_error", "recording_failed", "1")
    assert "secret" not in json.dumps(body)
    assert "x-tierbatch-task-id" not in headers  # no task to point at
    assert len(provider.calls) == 1 and writes.committed == []

    gateway, provider, writes = wired_gateway(fail=False)
    done = asyncio.run(gateway.complete(uuid.uuid4(), call))
    assert json.loads(done.content)["choices"][0]["message"]["content"] == "the secret answer"
    assert [r.task_id for r in writes.committed] == [done.task_id]


def test_a_failed_call_whose_record_fails_says_so() -> None:
    providers = FakeProviders({"gpt-4o": [PermanentProviderError("sim/gpt-4o: HTTP 400: nope", status_code=400)],
                               "gpt-4.1": [PermanentProviderError("sim/gpt-4.1: HTTP 400: nope", status_code=400)]})
    cooldown = Cooldown(FakeRedis(), "t:", CooldownPolicy())  # type: ignore[arg-type]
    gateway = Gateway(CONFIG, providers, cooldown, PriceBook(CONFIG), Recorder(Writes(True)))
    with pytest.raises(RecordingFailed) as caught:
        asyncio.run(gateway.complete(uuid.uuid4(), prepare_chat_call(CONFIG, {"model": "gpt-4o", "messages": HI},
                                                                     {})))
    assert openai_answer(caught.value)[:2] == (503, {**openai_body(caught.value), "code": "recording_failed"})


def has_usage(event: bytes) -> bool:
    payload = event.removeprefix(b"data: ").strip()
    return payload != b"[DONE]" and isinstance(json.loads(payload).get("usage"), dict)


def relay(gateway: Gateway, writes: Writes, include_usage: bool) -> list[bytes]:
    """A streamed call's events, asserting that `[DONE]` never comes before the record's commit."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    call = prepare_chat_call(CONFIG, body, {})

    async def run() -> list[bytes]:
        session = await gateway.open_stream(uuid.uuid4(), call)
        sent = []
        async for event in session.events():
            if b"[DONE]" in event or has_usage(event):
                assert writes.committed, "the end of the answer went out before its record was committed"
            sent.append(event)
        return sent

    return asyncio.run(run())


def test_a_stream_whose_record_fails_ends_with_an_error_not_done() -> None:
    for include_usage in (False, True):
        gateway, provider, writes = wired_gateway(fail=True)
        sent = relay(gateway, writes, include_usage)
        assert len(provider.calls) == 1
        assert all(b"[DONE]" not in e for e in sent)
        assert not any(has_usage(e) for e in sent)  # the usage chunk is held back too
        last = json.loads(sent[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "recording_failed" and last["error"]["type"] == "server_error"
        assert set(last["error"]) == {"message", "type", "param", "code"}


def test_a_recorded_stream_ends_with_usage_if_asked_then_done() -> None:
    for include_usage in (False, True):
        gateway, _, writes = wired_gateway(fail=False)
        sent = relay(gateway, writes, include_usage)
        assert sent[-1] == b"data: [DONE]\n\n"
        assert any(has_usage(e) for e in sent) is include_usage
        assert len(writes.committed) == 1 and writes.committed[0].status == "succeeded"
        assert writes.committed[0].output == "the secret answer"


def test_a_stream_the_provider_breaks_off_ends_with_an_error_event() -> None:
    stream = FakeStream([chunk("Once "), chunk("upon")])  # no finish, no [DONE]
    session, recorded = open_session(stream, include_usage=True)

    async def drain(events: AsyncIterator[bytes]) -> list[bytes]:
        return [event async for event in events]

    sent = asyncio.run(drain(session.events()))
    assert json.loads(sent[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_stream_broken"
    assert all(b"[DONE]" not in e for e in sent)
    assert recorded.records[0].status == "failed"


def test_a_recorder_stopped_midway_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    async def cancelled(records: Sequence[CallRecord]) -> None:
        raise asyncio.CancelledError

    record = prepare_chat_call(CONFIG, {"model": "gpt-4o-mini", "messages": HI}, {})

    async def run() -> None:
        recorder = Recorder(cancelled)
        await asyncio.wait_for(recorder.record(CallRecord(
            uuid.uuid4(), uuid.uuid4(), record.route, record.request, record.metadata, "failed", 1,
            record.received_at, record.received_at)), 5)

    with pytest.raises(RecordingFailed):
        asyncio.run(run())


def test_a_provider_answer_postgres_cannot_store_is_recorded_storable() -> None:
    call = prepare_chat_call(CONFIG, {"model": "gpt-4o-mini", "messages": HI}, {})
    raw = json.dumps(completion_body("bad \u0000 and \ud800 here"))  # escaped, as a provider sends them
    record = CallRecord(uuid.uuid4(), uuid.uuid4(), call.route, call.request, call.metadata, "succeeded", 1,
                        call.received_at, call.received_at, provider="openai", requested_model="gpt-4o-mini",
                        served_model="gpt-4o-mini\u0000", output="bad \u0000 and \ud800 here", response_json=raw,
                        usage=None, error=None)
    params = record_params([record])
    for text in params.values():
        assert "\\u0000" not in text and "\ud800" not in text
        text.encode("utf-8")  # what psycopg sends
    task = json.loads(params["tasks"])[0]
    assert task["output"] == "bad \ufffd and \ufffd here" and task["served_model"] == "gpt-4o-mini\ufffd"
    assert json.loads(task["response"])["choices"][0]["message"]["content"] == "bad \ufffd and \ufffd here"
    clean = dataclasses.replace(record, served_model="gpt-4o-mini", output="fine",
                                response_json=json.dumps(completion_body("fine")))
    assert json.loads(record_params([clean])["tasks"])[0]["response"] == clean.response_json  # kept as given


@pytest.mark.parametrize(("status", "headers", "content", "kind", "retry_after", "message"), [
    (429, {"retry-after": "7"}, b'{"error": {"message": "slow down"}}', RetryableProviderError, 7.0, "slow down"),
    (400, {}, b'{"error": {"message": "bad field", "param": "x"}}', PermanentProviderError, None, "bad field"),
    (503, {}, b"<html>overloaded</html>", RetryableProviderError, None,
     "the provider answered with a body that is not JSON (no content type, 23 bytes)"),
    (500, {"content-type": "text/plain; charset=utf-8"}, b'Traceback (most recent call last):\n  File "srv.py"',
     RetryableProviderError, None, "the provider answered with a body that is not JSON (text/plain, 50 bytes)"),
    (401, {}, b"", PermanentProviderError, None, "the provider answered with an empty body"),
])
def test_provider_error_answers_are_classified_by_status(status: int, headers: dict[str, str], content: bytes,
                                                         kind: type, retry_after: float | None,
                                                         message: str) -> None:
    providers = AsyncProviderClients(CONFIG, transport=httpx2.MockTransport(
        lambda _: httpx2.Response(status, headers=headers, content=content)))

    async def run() -> None:
        try:
            await providers.chat("sim", "gpt-4o-mini", {"messages": HI})
        finally:
            await providers.aclose()

    with pytest.raises(kind) as caught:
        asyncio.run(run())
    error = caught.value
    assert error.status_code == status and error.message == f"sim/gpt-4o-mini: HTTP {status}: {message}"
    assert getattr(error, "retry_after", None) == retry_after
