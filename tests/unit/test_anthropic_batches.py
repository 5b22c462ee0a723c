"""Anthropic's Message Batches behind the OpenAI batch shape (tierbatch/providers/anthropic_batches.py)
on a test transport: inline requests with tagged custom ids, statuses, results as OpenAI batch output
lines that ingestion reads, and recovery after a crash between create and store."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.errors import RetryableProviderError
from tierbatch.batching.ingest import classify_lines
from tierbatch.providers.anthropic_batches import metadata_tag
from tierbatch.providers.client import ProviderBatches, ProviderClients

TASK_A, TASK_B = uuid.UUID(int=1), uuid.UUID(int=2)
META = {"tierbatch_batch_id": "b-1"}


def config() -> Any:
    data = default_config_data()
    data["providers"]["claude"] = {"kind": "anthropic", "base_url": "http://anthropic.test",
                                   "default_max_tokens": 256}
    return parse_config(data, environ={})


def batch_body(status: str = "in_progress", total: int = 2, **fields: Any) -> dict[str, Any]:
    return {"id": "msgbatch_1", "type": "message_batch", "processing_status": status,
            "request_counts": {"processing": total if status != "ended" else 0,
                               "succeeded": total if status == "ended" else 0, "errored": 0, "canceled": 0,
                               "expired": 0},
            "created_at": "2026-12-01T12:00:00Z", "expires_at": "2026-12-02T12:00:00Z", "ended_at": None,
            "archived_at": None, "cancel_initiated_at": None,
            "results_url": "http://anthropic.test/v1/messages/batches/msgbatch_1/results"
            if status == "ended" else None, **fields}


def input_file(tmp_path: Path) -> Path:
    lines = [{"custom_id": str(TASK_A), "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "claude-haiku-4-5", "prompt_cache_key": "tierbatch-x",
                       "messages": [{"role": "system", "content": "Label it."}, {"role": "user", "content": "a"}]}},
             {"custom_id": str(TASK_B), "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "b"}],
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"name": "label", "schema": {"type": "object"}}}}},
             {"custom_id": str(uuid.UUID(int=3)), "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "c"}], "n": 2}}]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_batch_is_created_inline_with_tagged_custom_ids(tmp_path: Path) -> None:
    sent: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        request.read()
        sent.append(request)
        return httpx2.Response(200, json=batch_body())

    clients = ProviderClients(config(), transport=httpx2.MockTransport(answer))
    api = ProviderBatches(clients, "claude")
    file_id = api.upload_batch_file(str(input_file(tmp_path)), "batch.jsonl")
    assert sent == []  # nothing to upload: the requests go inline with the create
    assert api.holds_input_file(file_id)
    assert not ProviderBatches(clients, "claude").holds_input_file(file_id)  # another process: rebuild it
    info = api.create_batch(file_id, META)
    clients.close()

    [create] = sent
    assert (create.method, create.url.path) == ("POST", "/v1/messages/batches")
    requests = json.loads(create.content)["requests"]
    tag = metadata_tag(META)
    assert [r["custom_id"] for r in requests] == [f"{TASK_A.hex}-{tag}", f"{TASK_B.hex}-{tag}-j"]  # `n: 2` left out
    assert all(len(r["custom_id"]) <= 64 for r in requests)
    assert requests[0]["params"] == {
        "model": "claude-haiku-4-5", "max_tokens": 256,
        "system": [{"type": "text", "text": "Label it.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert requests[1]["params"]["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert (info.id, info.status, info.output_file_id) == ("msgbatch_1", "in_progress", None)
    assert not api.holds_input_file(file_id)


def test_results_are_openai_batch_output_lines_that_ingestion_reads() -> None:
    tag = metadata_tag(META)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
               "content": [{"type": "text", "text": "billing"}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 1024}}
    json_message = {**message, "content": [{"type": "tool_use", "id": "t", "name": "json_response",
                                            "input": {"label": "bug"}}], "stop_reason": "tool_use"}
    results = [
        {"custom_id": f"{TASK_A.hex}-{tag}", "result": {"type": "succeeded", "message": message}},
        {"custom_id": f"{TASK_B.hex}-{tag}-j", "result": {"type": "succeeded", "message": json_message}},
        {"custom_id": f"{uuid.UUID(int=3).hex}-{tag}", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}},
        {"custom_id": f"{uuid.UUID(int=4).hex}-{tag}", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}}},
        {"custom_id": f"{uuid.UUID(int=5).hex}-{tag}", "result": {"type": "expired"}},
    ]

    def answer(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/results"):
            return httpx2.Response(200, content="".join(json.dumps(r) + "\n" for r in results).encode(),
                                   headers={"content-type": "application/binary"})
        return httpx2.Response(200, json=batch_body("ended"))

    clients = ProviderClients(config(), transport=httpx2.MockTransport(answer))
    api = ProviderBatches(clients, "claude")
    info = api.retrieve_batch("msgbatch_1")
    assert (info.status, info.output_file_id, info.error_file_id) == ("completed", "msgbatch_1", None)
    lines = list(api.iter_file_lines("msgbatch_1"))
    clients.close()

    first = json.loads(lines[0])
    assert first["custom_id"] == str(TASK_A)
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 1024
    outcomes = classify_lines(lines)
    assert outcomes.successes[TASK_A]["choices"][0]["message"]["content"] == "billing"
    assert outcomes.successes[TASK_B]["choices"][0]["message"]["content"] == '{"label": "bug"}'
    assert list(outcomes.permanent) == [uuid.UUID(int=3)]
    assert set(outcomes.retryable) == {uuid.UUID(int=4), uuid.UUID(int=5)}


def _listing(*batches: dict[str, Any]) -> dict[str, Any]:
    return {"data": list(batches), "has_more": False, "first_id": None, "last_id": None}


def _recovery(batches: list[dict[str, Any]], results_tag: str, request_count: int | None = 2) -> Any:
    def answer(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path == "/v1/messages/batches":
            return httpx2.Response(200, json=_listing(*batches))
        batch_id = path.split("/")[4]
        if path.endswith("/results"):
            line = {"custom_id": f"{TASK_A.hex}-{results_tag}", "result": {"type": "expired"}}
            return httpx2.Response(200, content=(json.dumps(line) + "\n").encode())
        return httpx2.Response(200, json=next(b for b in batches if b["id"] == batch_id))

    clients = ProviderClients(config(), transport=httpx2.MockTransport(answer))
    try:
        return ProviderBatches(clients, "claude").find_batch_by_metadata(
            "tierbatch_batch_id", "b-1", 1_700_000_000, request_count=request_count)
    finally:
        clients.close()


def test_recovery_finds_an_ended_batch_by_the_tag_of_its_custom_ids() -> None:
    ended = batch_body("ended")
    found = _recovery([ended], metadata_tag(META))
    assert found is not None and found.id == "msgbatch_1"
    assert _recovery([ended], metadata_tag({"tierbatch_batch_id": "b-2"})) is None  # another batch's


def test_recovery_waits_for_a_running_batch_that_may_be_ours_and_skips_bigger_ones() -> None:
    with pytest.raises(RetryableProviderError):
        _recovery([batch_body("in_progress", total=2)], metadata_tag(META))
    assert _recovery([batch_body("in_progress", total=5)], metadata_tag(META)) is None
    old = batch_body("in_progress", created_at="2020-01-01T00:00:00Z")
    assert _recovery([old], metadata_tag(META)) is None  # created before the attempt
