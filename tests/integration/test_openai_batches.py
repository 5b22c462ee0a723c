"""The Batch API facade, driven with the real `openai` SDK: files + batches end to end with mixed
light/complex lines, listing with `has_more`, cancel, tenant isolation, and bad input (malformed
lines, limits, unsupported endpoint) answered in OpenAI's shape with nothing stored."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import openai
import psycopg
import pytest
from openai import OpenAI

from tests.support.openapi import validate
from tests.support.procs import free_port, python_module, wait_http_ok, wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

LIGHT_PROMPT = "Is this review positive? 'Great product'"
COMPLEX_PROMPT = "Explain step by step how to design a rate limiter."


_clients: list[OpenAI] = []


def sdk(base_url: str, key: str) -> OpenAI:
    client = OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def line(custom_id: str, content: str, model: str = "smart-select", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def upload(client: OpenAI, content: bytes, name: str = "requests.jsonl") -> dict[str, Any]:
    raw = client.files.with_raw_response.create(file=(name, io.BytesIO(content)), purpose="batch")
    body: dict[str, Any] = json.loads(raw.content)
    validate(body, "OpenAIFile")
    return body


def create_batch(client: OpenAI, file_id: str, **kwargs: Any) -> dict[str, Any]:
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", **kwargs)
    body: dict[str, Any] = json.loads(raw.content)
    validate(body, "Batch")
    return body


def retrieve(client: OpenAI, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(client.batches.with_raw_response.retrieve(batch_id).content)
    validate(body, "Batch")
    return body


def wait_for_batch(client: OpenAI, batch_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = retrieve(client, batch_id)
        return body if body["status"] in statuses else None

    result = wait_until(reached, timeout, interval=0.2, message=f"batch {batch_id} in {statuses}")
    assert isinstance(result, dict)
    return result


def output_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    lines = [json.loads(raw) for raw in client.files.content(file_id).text.splitlines() if raw.strip()]
    for item in lines:
        validate(item, "BatchRequestOutput")
    return lines


def tenant_rows(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def test_mixed_batch_routes_every_line_and_joins_results_by_custom_id(sim_reset: Stack) -> None:
    stack = sim_reset
    client = sdk(stack.api_url, stack.new_tenant_key("batch-e2e"))
    requests = [
        *(line(f"light-{i}", f"{LIGHT_PROMPT} #{i}", metadata={"tier": "light"}) for i in range(6)),
        *(line(f"auto-light-{i}", f"Label this: ok #{i}", metadata={"task_type": "classification"})
          for i in range(3)),
        *(line(f"complex-{i}", f"{COMPLEX_PROMPT} #{i}") for i in range(3)),  # auto: reasoning cue
        line("named-complex", "Say hi", model="gpt-4o"),
        line("named-light", "Say hi", model="gpt-4o-mini", max_tokens=20, seed=1),
    ]
    content = jsonl(requests)
    uploaded = upload(client, content)
    assert uploaded["bytes"] == len(content) and uploaded["purpose"] == "batch"
    assert client.files.content(uploaded["id"]).content == content

    created = create_batch(client, uploaded["id"], metadata={"run": "e2e"})
    assert created["status"] == "in_progress" and created["metadata"] == {"run": "e2e"}
    assert created["request_counts"]["total"] == len(requests)

    done = wait_for_batch(client, created["id"], {"completed", "failed", "cancelled", "expired"})
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": len(requests), "completed": len(requests), "failed": 0}
    outputs = output_lines(client, done.get("output_file_id"))
    assert output_lines(client, done.get("error_file_id")) == []
    assert sorted(o["custom_id"] for o in outputs) == sorted(r["custom_id"] for r in requests)
    served = {o["custom_id"]: o["response"]["body"]["model"] for o in outputs}
    for item in outputs:
        assert item["response"]["status_code"] == 200
        validate(item["response"]["body"], "CreateChatCompletionResponse")
    for custom_id, model in served.items():
        expected = "gpt-4o" if custom_id.startswith(("complex", "named-complex")) else "gpt-4o-mini"
        assert model == expected, (custom_id, model)

    stats = stack.sim("GET", "/_sim/stats")
    light_lines = sum(1 for r in requests if served[r["custom_id"]] == "gpt-4o-mini")
    assert stats["batch_lines"] == light_lines  # light lines went through a provider batch...
    assert stats["chat_calls"] == {"gpt-4o": 4}  # ...complex ones were called immediately
    # per-line cost tracking: the batch is a job; every line has its ledger row
    rows = tenant_rows(stack, "SELECT l.mode::text, count(*) FROM ledger_entries l JOIN client_batches b "
                              "ON b.job_id = l.job_id WHERE b.id = %s GROUP BY 1 ORDER BY 1", created["id"])
    assert rows == [("batch", light_lines), ("immediate", 4)]
    # a second read serves the frozen batch
    assert retrieve(client, created["id"]) == done


def test_batches_list_pages_with_has_more(sim_reset: Stack) -> None:
    stack = sim_reset
    client = sdk(stack.api_url, stack.new_tenant_key("batch-list"))
    file_id = upload(client, jsonl([line("only", "Say hi", metadata={"tier": "complex"})]))["id"]
    ids = [create_batch(client, file_id)["id"] for _ in range(3)]
    first = json.loads(client.batches.with_raw_response.list(limit=2).content)
    validate(first, "ListBatchesResponse")
    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = json.loads(client.batches.with_raw_response.list(limit=2, after=first["last_id"]).content)
    validate(second, "ListBatchesResponse")
    assert [b["id"] for b in second["data"]] == ids[:1] and second["has_more"] is False
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK's auto-paging follows has_more


def test_cancel_cancels_what_has_not_started(sim_reset: Stack) -> None:
    stack = sim_reset
    # a provider batch is formed only after max_wait_seconds: light lines wait, and can be cancelled
    stack.sim("POST", "/_sim/config", {"batch": {"in_progress_seconds": 30}})
    client = sdk(stack.api_url, stack.new_tenant_key("batch-cancel"))
    requests = [line(f"c-{i}", f"Label this: fine #{i}", metadata={"tier": "light"}) for i in range(20)]
    file_id = upload(client, jsonl(requests))["id"]
    batch = create_batch(client, file_id)
    raw = client.batches.with_raw_response.cancel(batch["id"])
    cancelling = json.loads(raw.content)
    validate(cancelling, "Batch")
    assert cancelling["status"] in ("cancelling", "cancelled")
    done = wait_for_batch(client, batch["id"], {"cancelled"}, timeout=30)
    errors = output_lines(client, done.get("error_file_id"))
    outputs = output_lines(client, done.get("output_file_id"))
    assert sorted(o["custom_id"] for o in errors + outputs) == sorted(r["custom_id"] for r in requests)
    cancelled = [e for e in errors if (e.get("error") or {}).get("code") == "batch_cancelled"]
    assert len(cancelled) == 20 - len(outputs) and cancelled
    assert done["request_counts"]["completed"] == len(outputs)
    assert stack.sim("GET", "/_sim/stats")["batch_lines"] == 0  # nothing reached a provider batch
    with pytest.raises(openai.ConflictError) as again:
        client.batches.cancel(batch["id"])
    validate(again.value.response.json(), "ErrorResponse")


def test_files_and_batches_belong_to_their_tenant(sim_reset: Stack) -> None:
    stack = sim_reset
    owner = sdk(stack.api_url, stack.new_tenant_key("owner"))
    other = sdk(stack.api_url, stack.new_tenant_key("other"))
    file_id = upload(owner, jsonl([line("x", "Say hi", metadata={"tier": "complex"})]))["id"]
    batch_id = create_batch(owner, file_id)["id"]
    for call in (lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                 lambda: other.files.delete(file_id), lambda: other.batches.retrieve(batch_id),
                 lambda: other.batches.cancel(batch_id),
                 lambda: other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError) as hidden:
            call()
        validate(hidden.value.response.json(), "ErrorResponse")
    assert [b.id for b in other.batches.list()] == []
    deleted = owner.files.delete(file_id)
    assert deleted.deleted is True and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        owner.files.retrieve(file_id)


BAD_LINES: list[tuple[str, bytes, str]] = [
    ("not json", b'{"custom_id": "a", "method": "POST"\n', "invalid_json_line"),
    ("duplicate custom_id", jsonl([line("a", "hi"), line("a", "hi again")]), "duplicate_custom_id"),
    ("wrong method", jsonl([{**line("a", "hi"), "method": "GET"}]), "invalid_method"),
    ("wrong url", jsonl([{**line("a", "hi"), "url": "/v1/embeddings"}]), "invalid_url"),
    ("no custom_id", jsonl([{k: v for k, v in line("a", "hi").items() if k != "custom_id"}]),
     "missing_required_parameter"),
    ("unknown model", jsonl([line("a", "hi"), line("b", "hi", model="gpt-9")]), "model_not_found"),
    ("no messages", jsonl([{**line("a", "hi"), "body": {"model": "smart-select"}}]), "missing_required_parameter"),
    ("stream", jsonl([line("a", "hi", stream=True)]), "invalid_value"),
    ("empty", b"\n\n", "empty_file"),
]


def file_count(stack: Stack) -> int:
    return int(tenant_rows(stack, "SELECT (SELECT count(*) FROM files) + (SELECT count(*) FROM file_parts)")[0][0])


def test_bad_files_and_batches_answer_openai_errors_and_store_nothing(sim_reset: Stack) -> None:
    stack = sim_reset
    client = sdk(stack.api_url, stack.new_tenant_key("bad-batch"))
    stored_before = file_count(stack)
    for name, content, code in BAD_LINES:
        with pytest.raises(openai.BadRequestError) as refused:
            upload(client, content)
        body = refused.value.response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["code"] == code, (name, body)
    with pytest.raises(openai.BadRequestError) as wrong_name:
        upload(client, jsonl([line("a", "hi")]), name="requests.csv")
    assert wrong_name.value.response.json()["error"]["code"] == "invalid_file_format"
    # OpenAI's 50,000-request limit (a small file: the lines are tiny)
    too_many = jsonl([line(f"r{i}", "hi") for i in range(50_001)])
    with pytest.raises(openai.BadRequestError) as crowded:
        upload(client, too_many)
    assert crowded.value.response.json()["error"]["code"] == "too_many_requests"
    assert file_count(stack) == stored_before
    assert list(client.files.list()) == []

    file_id = upload(client, jsonl([line("a", "hi")]))["id"]
    for kwargs, param in (({"endpoint": "/v1/embeddings"}, "endpoint"),
                          ({"endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window")):
        arguments = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                     **kwargs}
        with pytest.raises(openai.BadRequestError) as unsupported:
            client.batches.create(**arguments)
        body = unsupported.value.response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert list(client.batches.list()) == []
    assert tenant_rows(stack, "SELECT count(*) FROM tasks t JOIN tenants n ON n.id = t.tenant_id "
                              "WHERE n.name = 'bad-batch'") == [(0,)]


@pytest.fixture
def small_limit_api(stack: Stack) -> Iterator[str]:
    """A second API process whose batch files may hold at most 64 KiB (the limit comes from its environment)."""
    port = free_port()
    proc = stack._start("api-small-files",
                        python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)),
                        {"TIERBATCH_BATCH_FILE_MAX_BYTES": str(64 * 1024)})
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_a_file_over_the_size_limit_is_refused_whole(sim_reset: Stack, small_limit_api: str) -> None:
    stack = sim_reset
    client = sdk(small_limit_api, stack.new_tenant_key("big-file"))
    stored_before = file_count(stack)
    content = jsonl([line(f"r{i}", "x" * 200) for i in range(400)])  # ~110 KB
    assert len(content) > 64 * 1024
    with pytest.raises(openai.APIStatusError) as too_big:
        upload(client, content)
    assert too_big.value.status_code == 413
    body = too_big.value.response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "file_too_large"
    assert file_count(stack) == stored_before
    assert upload(client, content[: 32 * 1024].rsplit(b"\n", 1)[0] + b"\n")["bytes"] < 64 * 1024
