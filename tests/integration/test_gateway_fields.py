"""The gateway's field list and fail-closed recording, against the running stack, as a hostile tenant
would probe them: fields billed unpriced or keeping data at the provider are refused by name with no
provider call (simulator stats) and nothing stored; characters Postgres cannot store are refused before
any call, streamed or not; and when a call cannot be recorded, the client gets an error, not the
answer (a stream ends with an error event, never `[DONE]`)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI

from tests.integration.conftest import delete_redis_keys
from tests.support.openapi import validate
from tests.support.stack import Stack, psycopg_dsn
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.gateway.recorder import CallRecord, CallWriter
from tierbatch.gateway.routing import Route
from tierbatch.ledger.pricing import TokenUsage

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Say hi"}]
_clients: list[OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
def gw(sim_reset: Stack) -> Iterator[Stack]:
    delete_redis_keys(f"{sim_reset.redis_prefix}tierbatch:cooldown:")
    yield sim_reset
    delete_redis_keys(f"{sim_reset.redis_prefix}tierbatch:cooldown:")


def tenant(stack: Stack, name: str) -> tuple[str, str]:
    """(tenant id, API key) of a new tenant."""
    with stack.admin_client() as admin:
        response = admin.post("/v1/admin/tenants", json={"name": name})
        response.raise_for_status()
        body = response.json()
    return body["id"], body["api_key"]


def sdk(stack: Stack, key: str) -> OpenAI:
    client = OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=30)
    _clients.append(client)
    return client


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def sim_calls(stack: Stack) -> dict[str, int]:
    calls: dict[str, int] = stack.sim("GET", "/_sim/stats")["chat_calls"]
    return calls


def post_raw(stack: Stack, key: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/v1/chat/completions", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"service_tier": "priority"}, "service_tier", "unsupported_value"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_value"),
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio",
     "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities[1]", "unsupported_value"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type", "unsupported_value"),
    ({"frobnicate": True}, "frobnicate", "unknown_parameter"),
]


def test_unpriced_and_data_keeping_fields_are_refused_by_name_without_a_provider_call(gw: Stack) -> None:
    stack = gw
    tenant_id, key = tenant(stack, "fields")
    client = sdk(stack, key)
    for extra, param, code in REFUSED:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="smart-select", messages=HI, stream=stream,
                                               extra_body=extra)
            body = refused.value.response.json()
            validate(body, "ErrorResponse")
            assert body["error"]["type"] == "invalid_request_error"
            assert (body["error"]["param"], body["error"]["code"]) == (param, code), (extra, body)
    # what an attacker checks: the provider was never asked, and nothing was recorded (free, but no answer)
    assert sim_calls(stack) == {}
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant_id) == [(0,)]
    assert query(stack, "SELECT count(*) FROM ledger_entries WHERE tenant_id = %s", tenant_id) == [(0,)]

    # the same refusals on a batch input file: refused at upload, before anything is stored
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smart-select", "messages": HI, "service_tier": "priority"}}
    with pytest.raises(openai.BadRequestError) as batch_line:
        client.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch")
    assert batch_line.value.response.json()["error"]["param"] == "body.service_tier"
    assert list(client.files.list()) == []


def test_standard_service_tiers_and_store_false_are_served_and_metered(gw: Stack) -> None:
    stack = gw
    tenant_id, key = tenant(stack, "fields-ok")
    client = sdk(stack, key)
    for tier in ("auto", "default"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, service_tier=tier, store=False, metadata={"team": "a"})
        assert raw.parse().choices[0].message.content
        task_id = raw.headers["x-tierbatch-task-id"]
        [(request, metadata)] = query(stack, "SELECT request, metadata FROM tasks WHERE id = %s", task_id)
        assert request["service_tier"] == tier and request["store"] is False
        assert "metadata" not in request and metadata == {"team": "a"}  # ours, kept on the task, never sent
        assert query(stack, "SELECT count(*) FROM ledger_entries WHERE task_id = %s", task_id) == [(1,)]
    assert sim_calls(stack) == {"gpt-4o-mini": 2}
    assert query(stack, "SELECT count(*) FROM ledger_entries WHERE tenant_id = %s", tenant_id) == [(2,)]


def test_characters_postgres_cannot_store_are_refused_before_any_provider_call(gw: Stack) -> None:
    stack = gw
    tenant_id, key = tenant(stack, "bytes")
    # raw JSON escapes: NUL and an unpaired surrogate, in content, a metadata value, a metadata key; NaN
    cases = [
        (b'{"model": "smart-select", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
         "messages[0].content"),
        (b'{"model": "smart-select", "stream": true, "messages": [{"role": "user", "content": "a\\u0000b"}]}',
         "messages[0].content"),
        (b'{"model": "smart-select", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages[0].content"),
        (b'{"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], '
         b'"metadata": {"team": "x\\u0000"}}', "metadata.team"),
        (b'{"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], '
         b'"metadata": {"t\\udc80": "x"}}', "metadata.t\\udc80"),
        # not JSON numbers, though Python's parser takes them
        (b'{"model": "smart-select", "stream": true, "messages": [{"role": "user", "content": "hi"}], '
         b'"temperature": NaN}', "temperature"),
        (b'{"model": "smart-select", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
         b'"function", "function": {"name": "f", "parameters": {"default": 1e999}}}]}',
         "tools[0].function.parameters.default"),
    ]
    for content, param in cases:
        response = post_raw(stack, key, content)
        assert response.status_code == 400, response.text
        validate(response.json(), "ErrorResponse")
        assert response.json()["error"]["param"] == param
    deep = post_raw(stack, key, b"[" * 100_000)
    assert deep.status_code == 400 and deep.json()["error"]["type"] == "invalid_request_error"
    nested = post_raw(stack, key, json.dumps({"model": "smart-select", "messages": HI, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": _nested(200)}}]}).encode())
    assert nested.status_code == 400 and nested.json()["error"]["param"].startswith("tools[0].function.parameters")
    assert sim_calls(stack) == {}
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant_id) == [(0,)]


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


@pytest.fixture
def unrecordable(gw: Stack) -> Iterator[tuple[Stack, str, str]]:
    """A tenant whose task rows the database refuses (a trigger): every call of it fails to be recorded,
    as when Postgres is down, while every other tenant's calls are recorded as usual."""
    stack = gw
    tenant_id, key = tenant(stack, "unrecordable")
    name = "refuse_" + uuid.UUID(tenant_id).hex
    with psycopg.connect(psycopg_dsn(stack.database_url), autocommit=True) as conn:
        conn.execute(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'recording refused for this test'; END $$")
        conn.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON tasks FOR EACH ROW "
                     f"WHEN (NEW.tenant_id = '{tenant_id}'::uuid) EXECUTE FUNCTION {name}()")
    try:
        yield stack, tenant_id, key
    finally:
        with psycopg.connect(psycopg_dsn(stack.database_url), autocommit=True) as conn:
            conn.execute(f"DROP TRIGGER IF EXISTS {name} ON tasks")
            conn.execute(f"DROP FUNCTION IF EXISTS {name}()")


def test_an_answer_that_cannot_be_recorded_is_never_served(unrecordable: tuple[Stack, str, str]) -> None:
    stack, tenant_id, key = unrecordable
    client = sdk(stack, key)
    with pytest.raises(openai.InternalServerError) as withheld:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    error = withheld.value.response
    assert error.status_code == 503 and error.headers["retry-after"] == "1"
    validate(error.json(), "ErrorResponse")
    assert error.json()["error"]["code"] == "recording_failed"
    assert "choices" not in error.text

    # streamed: the content may have started, but the end ([DONE], the usage chunk) never comes: an error
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}) as response:
        events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert "[DONE]" not in events
    parsed = [json.loads(e) for e in events]
    assert not any(p.get("usage") for p in parsed)
    assert parsed[-1]["error"]["code"] == "recording_failed"
    # the SDK's own stream reader raises instead of ending quietly
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True):
            pass

    assert sim_calls(stack) == {"gpt-4o-mini": 3}  # the provider answered; the answers were withheld
    assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant_id) == [(0,)]
    # the other tenants are served and recorded as usual meanwhile
    _, other_key = tenant(stack, "recordable")
    raw = sdk(stack, other_key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert query(stack, "SELECT count(*) FROM ledger_entries WHERE task_id = %s",
                 raw.headers["x-tierbatch-task-id"]) == [(1,)]


def test_a_provider_answer_with_unstorable_characters_is_still_recorded(gw: Stack) -> None:
    """The gateway's writer against the real database: an answer holding NUL or an unpaired surrogate
    still leaves its task and ledger row (those characters replaced in the stored copy)."""
    stack = gw
    tenant_id, _ = tenant(stack, "odd-answer")
    now = datetime.now(UTC)
    answer = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "a\u0000b\ud800c"},
                           "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    route = Route(Tier.LIGHT, RequestedTier.AUTO, "test", "general", [])
    record = CallRecord(uuid.uuid4(), uuid.UUID(tenant_id), route, {"messages": HI}, {}, "succeeded", 1, now, now,
                        provider="sim",
                        requested_model="gpt-4o-mini", served_model="gpt-4o-mini", output="a\u0000b\ud800c",
                        response_json=json.dumps(answer), usage=TokenUsage(3, 0, 2), latency_ms=1,
                        cost_usd=None, baseline_cost_usd=None)

    async def write() -> None:
        writer = CallWriter(psycopg_dsn(stack.database_url), durable=True)
        try:
            await writer.write([record])
        finally:
            await writer.aclose()

    asyncio.run(write())
    [(output, response)] = query(stack, "SELECT output, response FROM tasks WHERE id = %s", record.task_id)
    assert output == "a\ufffdb\ufffdc" and response["choices"][0]["message"]["content"] == "a\ufffdb\ufffdc"
    assert query(stack, "SELECT count(*) FROM ledger_entries WHERE task_id = %s", record.task_id) == [(1,)]
