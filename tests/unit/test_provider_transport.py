"""The worker's sync provider client (tierbatch/providers/client.py `ProviderClients`) on a test transport:
what a chat call and the Batch API calls send, what comes back, and provider errors mapped by type."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.errors import PermanentProviderError, RetryableProviderError
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.providers.adapter import ProviderBatchInfo
from tierbatch.providers.client import ProviderBatches, ProviderClients

CONFIG = parse_config(default_config_data(), environ={})
HI = [{"role": "user", "content": "hi"}]


class Recorder:
    """The provider behind `httpx2.MockTransport`: keeps each request, answers with `answer`."""

    def __init__(self, answer: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)


def clients_for(answer: Callable[[httpx2.Request], httpx2.Response]) -> tuple[ProviderClients, Recorder]:
    recorder = Recorder(answer)
    return ProviderClients(CONFIG, transport=httpx2.MockTransport(recorder)), recorder


def batch_body(**fields: Any) -> dict[str, Any]:
    return {"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-in",
            "completion_window": "24h", "status": "in_progress", "created_at": 1_700_000_000,
            "output_file_id": None, "error_file_id": None, "metadata": {"tierbatch_batch_id": "b-1"}, **fields}


def test_a_chat_call_sends_the_request_and_reads_the_answer() -> None:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}
    clients, provider = clients_for(lambda _: httpx2.Response(200, json=answer))
    try:
        result = clients.chat("sim", "gpt-4o-mini", {"messages": HI, "temperature": 0}, cache_key="tierbatch-k")
    finally:
        clients.close()

    [sent] = provider.requests
    assert (sent.method, str(sent.url)) == ("POST", "http://127.0.0.1:8100/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer unused"
    assert json.loads(sent.content) == {"model": "gpt-4o-mini", "messages": HI, "temperature": 0,
                                        "prompt_cache_key": "tierbatch-k"}
    assert (result.provider, result.requested_model, result.served_model, result.output) == (
        "sim", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "hello")
    assert result.usage == TokenUsage(input_tokens=12, cached_tokens=4, output_tokens=3, reasoning_tokens=0)
    assert result.body["id"] == "chatcmpl-1"


def test_a_rate_limited_chat_call_is_retryable_after_the_providers_delay() -> None:
    clients, provider = clients_for(lambda _: httpx2.Response(
        429, headers={"retry-after": "7"}, json={"error": {"message": "slow down", "type": "rate_limit"}}))
    with pytest.raises(RetryableProviderError) as caught:
        clients.chat("sim", "gpt-4o-mini", {"messages": HI})
    clients.close()
    error = caught.value
    assert (error.status_code, error.retry_after, error.provider, error.model) == (429, 7.0, "sim", "gpt-4o-mini")
    assert error.message == "sim/gpt-4o-mini: HTTP 429: slow down"
    assert len(provider.requests) == 1  # the SDK does not retry: retries are ours


def test_batch_calls_send_the_file_and_read_the_batch(tmp_path: Path) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/files"):
            return httpx2.Response(200, json={"id": "file-in", "object": "file", "bytes": 12, "created_at": 1,
                                              "filename": "b.jsonl", "purpose": "batch", "status": "processed"})
        return httpx2.Response(200, json=batch_body(
            status="completed", output_file_id="file-out", error_file_id="file-err",
            errors={"object": "list", "data": [{"code": "token_limit", "message": "too many", "line": 3}]}))

    clients, provider = clients_for(answer)
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b'{"custom_id":"a"}\n')
    api = ProviderBatches(clients, "sim")
    try:
        file_id = api.upload_batch_file(str(path), "b.jsonl")
        info = api.retrieve_batch("batch_1")
    finally:
        clients.close()

    upload, retrieve = provider.requests
    assert (upload.method, upload.url.path) == ("POST", "/v1/files")
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert b'{"custom_id":"a"}\n' in upload.content and b'name="purpose"\r\n\r\nbatch' in upload.content
    assert file_id == "file-in"
    assert (retrieve.method, retrieve.url.path) == ("GET", "/v1/batches/batch_1")
    assert info == ProviderBatchInfo(id="batch_1", status="completed", output_file_id="file-out",
                                     error_file_id="file-err",
                                     errors=[{"code": "token_limit", "message": "too many", "line": 3}],
                                     metadata={"tierbatch_batch_id": "b-1"}, created_at=1_700_000_000)


def test_a_refused_batch_call_is_permanent() -> None:
    clients, provider = clients_for(lambda _: httpx2.Response(
        400, json={"error": {"message": "no such batch", "type": "invalid_request_error"}}))
    with pytest.raises(PermanentProviderError) as caught:
        ProviderBatches(clients, "sim").retrieve_batch("batch_missing")
    clients.close()
    error = caught.value
    assert not isinstance(error, RetryableProviderError)
    assert (error.status_code, error.provider, error.model) == (400, "sim", "batch")
    assert error.message == "sim/batch: HTTP 400: no such batch"
    assert [r.url.path for r in provider.requests] == ["/v1/batches/batch_missing"]
