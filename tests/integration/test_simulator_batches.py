"""The simulator's files and batches as a real process, reached through the `openai` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.integration.test_simulator_process import Sim, start
from tests.support.openapi import validate
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

CONFIG = """
[batch]
validating_seconds = 0.1
in_progress_seconds = 0.2
finalizing_seconds = 0.1
cancelling_seconds = 0.1
[models."*"]
latency_ms = [0, 0]
agreement = 0.9
[models."gpt-4o-mini"]
served_as = "gpt-4o-mini-2024-07-18"
"""
ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


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


def line(custom_id: str, text: str = "", model: str = "gpt-4o-mini", url: str = ENDPOINT) -> dict[str, Any]:
    content = f"Ticket {custom_id}: {text or 'my invoice is wrong'}\nLabels: billing, account, bug"
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(sim: Sim, lines: list[Any], name: str = "input.jsonl") -> str:
    raw = sim.client.files.with_raw_response.create(file=(name, jsonl(lines)), purpose="batch")
    body = json.loads(raw.text)
    validate(body, "OpenAIFile")
    assert body["purpose"] == "batch" and body["filename"] == name
    return str(body["id"])


def create(sim: Sim, file_id: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    raw = sim.client.batches.with_raw_response.create(
        input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata)
    body: dict[str, Any] = json.loads(raw.text)
    validate(body, "Batch")
    assert body["status"] == "validating"
    return body


def get(sim: Sim, batch_id: str) -> dict[str, Any]:
    response = sim.http.get(f"/v1/batches/{batch_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    validate(body, "Batch")
    return body


def wait_for(sim: Sim, batch_id: str, statuses: set[str], timeout: float = 15.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = get(sim, batch_id)
        return body if body["status"] in statuses else None

    result = wait_until(reached, timeout, interval=0.02, message=f"batch {batch_id} in {statuses}")
    assert isinstance(result, dict)
    return result


def read_lines(sim: Sim, file_id: str) -> list[dict[str, Any]]:
    validate(json.loads(sim.client.files.with_raw_response.retrieve(file_id).text), "OpenAIFile")
    lines = [json.loads(x) for x in sim.client.files.content(file_id).text.splitlines() if x]
    for out in lines:
        validate(out, "BatchRequestOutput")
    return lines


def run(sim: Sim, lines: list[Any], statuses: set[str] = TERMINAL, **kwargs: Any) -> dict[str, Any]:
    batch = create(sim, upload(sim, lines), **kwargs)
    return wait_for(sim, batch["id"], statuses)


def test_happy_path(sim: Sim) -> None:
    sim.configure({"batch": {"validating_seconds": 0.3, "in_progress_seconds": 0.6, "finalizing_seconds": 0.3}})
    lines = [line(f"task-{i}", f"problem number {i}") for i in range(30)]
    file_id = upload(sim, lines)
    batch = create(sim, file_id, metadata={"tierbatch_batch_id": "42"})
    assert batch["metadata"] == {"tierbatch_batch_id": "42"}
    assert batch["input_file_id"] == file_id and batch["completion_window"] == "24h"
    assert batch["expires_at"] == batch["created_at"] + 86400
    seen = [batch["status"]]

    def track() -> bool:
        status = get(sim, batch["id"])["status"]
        if status != seen[-1]:
            seen.append(status)
        return status in TERMINAL

    wait_until(track, 15, interval=0.02, message="batch completion")
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    done = get(sim, batch["id"])
    assert done["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert done["model"] == "gpt-4o-mini"
    assert batch["created_at"] <= done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    assert "error_file_id" not in done and "errors" not in done
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0

    outputs = read_lines(sim, done["output_file_id"])
    assert sorted(o["custom_id"] for o in outputs) == sorted(x["custom_id"] for x in lines)
    assert [o["custom_id"] for o in outputs] != [x["custom_id"] for x in lines]  # shuffled
    assert len({o["id"] for o in outputs}) == 30
    by_id = {x["custom_id"]: x for x in lines}
    for out in outputs[:5]:
        assert out["error"] is None and out["response"]["status_code"] == 200
        body = out["response"]["body"]
        validate(body, "CreateChatCompletionResponse")
        assert body["model"] == "gpt-4o-mini-2024-07-18"
        immediate = sim.client.chat.completions.create(**by_id[out["custom_id"]]["body"])
        assert body["choices"][0]["message"]["content"] == immediate.choices[0].message.content
        assert body["usage"]["prompt_tokens"] == immediate.usage.prompt_tokens  # type: ignore[union-attr]
    file = sim.client.files.retrieve(done["output_file_id"])
    assert file.purpose == "batch_output"
    stats = sim.stats()
    assert (stats["files_created"], stats["batches_created"], stats["batch_lines"]) == (1, 1, 30)


def test_advances_without_polling(sim: Sim) -> None:
    before = sim.stats()["batches_by_status"].get("completed", 0)
    batch = create(sim, upload(sim, [line("a"), line("b")]))
    wait_until(lambda: sim.stats()["batches_by_status"].get("completed", 0) == before + 1, 15,
               message="the batch to complete by itself")
    assert get(sim, batch["id"])["status"] == "completed"


@pytest.mark.parametrize(("lines", "config", "code", "line_no"), [
    ([line("a"), "{this is not json"], {}, "invalid_json_line", 2),
    ([line("a"), line("b"), line("a")], {}, "duplicate_custom_id", 3),
    ([line("a"), line("b", url="/v1/embeddings")], {}, "url_mismatch", 2),
    ([line("a"), line("b", model="gpt-4o")], {}, "model_mismatch", 2),
    ([line(f"t{i}") for i in range(4)], {"max_lines": 3}, "too_many_tasks", None),
    ([line(f"t{i}") for i in range(4)], {"max_bytes": 200}, "file_too_large", None),
    (["", ""], {}, "empty_file", None),
])
def test_validation_failures(sim: Sim, lines: list[Any], config: dict[str, Any], code: str,
                             line_no: int | None) -> None:
    if config:
        sim.configure({"batch": config})
    done = run(sim, lines)
    assert done["status"] == "failed"
    assert done["failed_at"] >= done["created_at"]
    assert done["errors"]["object"] == "list"
    first = done["errors"]["data"][0]
    assert (first["code"], first["line"]) == (code, line_no)
    assert first["message"]
    assert "output_file_id" not in done and "in_progress_at" not in done


def test_line_errors(sim: Sim) -> None:
    sim.configure({"batch": {"line_error_rate": 0.5}})
    lines = [line(f"t{i}") for i in range(90)]
    no_messages = {"custom_id": "no-messages", "method": "POST", "url": ENDPOINT, "body": {"model": "gpt-4o-mini"}}
    done = run(sim, [*lines, no_messages])
    assert done["status"] == "completed"
    counts = done["request_counts"]
    assert counts["total"] == 91 and counts["completed"] + counts["failed"] == 91
    assert 25 < counts["failed"] < 70
    outputs = read_lines(sim, done["output_file_id"])
    errors = read_lines(sim, done["error_file_id"])
    assert (len(outputs), len(errors)) == (counts["completed"], counts["failed"])
    assert {o["custom_id"] for o in outputs} | {e["custom_id"] for e in errors} == \
        {x["custom_id"] for x in [*lines, no_messages]}
    kinds = set()
    for err in errors:
        if err["response"] is None:
            kinds.add("non_http")
            assert err["error"]["code"] and err["error"]["message"]
        else:
            kinds.add(err["response"]["status_code"])
            assert err["error"] is None
            validate(err["response"]["body"], "ErrorResponse")
    assert kinds == {"non_http", 400, 500}
    rejected = next(e for e in errors if e["custom_id"] == "no-messages")
    assert rejected["response"]["status_code"] == 400


def test_invalid_request_line_fails_alone(sim: Sim) -> None:
    no_messages = {"custom_id": "no-messages", "method": "POST", "url": ENDPOINT, "body": {"model": "gpt-4o-mini"}}
    done = run(sim, [line("ok"), no_messages])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    [rejected] = read_lines(sim, done["error_file_id"])
    assert rejected["custom_id"] == "no-messages" and rejected["response"]["status_code"] == 400
    assert rejected["response"]["body"]["error"]["param"] == "messages"
    assert rejected["response"]["body"]["error"]["code"] == "missing_required_parameter"


def test_only_retryable_line_errors(sim: Sim) -> None:
    sim.configure({"batch": {"line_error_rate": 1.0, "line_error_kinds": ["http_500"]}})
    done = run(sim, [line(f"t{i}") for i in range(10)])
    assert done["request_counts"] == {"total": 10, "completed": 0, "failed": 10}
    assert "output_file_id" not in done
    assert {e["response"]["status_code"] for e in read_lines(sim, done["error_file_id"])} == {500}


def test_expiry(sim: Sim) -> None:
    sim.configure({"batch": {"expire": True, "expire_completed_share": 0.5}})
    done = run(sim, [line(f"t{i}") for i in range(20)])
    assert done["status"] == "expired"
    assert done["expired_at"] >= done["in_progress_at"]
    assert done["request_counts"] == {"total": 20, "completed": 10, "failed": 10}
    outputs = read_lines(sim, done["output_file_id"])
    errors = read_lines(sim, done["error_file_id"])
    assert len(outputs) == 10 and all(o["response"]["status_code"] == 200 for o in outputs)
    assert len(errors) == 10
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)


def test_cancel_in_progress_keeps_partial_output(sim: Sim) -> None:
    sim.configure({"batch": {"in_progress_seconds": 4.0, "cancelling_seconds": 0.3}})
    batch = create(sim, upload(sim, [line(f"t{i}") for i in range(40)]))
    wait_until(lambda: get(sim, batch["id"])["request_counts"]["completed"] >= 5, 15, interval=0.02,
               message="some requests done")
    raw = sim.client.batches.with_raw_response.cancel(batch["id"])
    cancelling = json.loads(raw.text)
    validate(cancelling, "Batch")
    assert cancelling["status"] == "cancelling" and "cancelling_at" in cancelling
    done = wait_for(sim, batch["id"], TERMINAL)
    assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
    counts = done["request_counts"]
    assert 5 <= counts["completed"] < 40 and counts["completed"] + counts["failed"] == 40
    outputs = read_lines(sim, done["output_file_id"])
    errors = read_lines(sim, done["error_file_id"])
    assert len(outputs) == counts["completed"]
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert len(outputs) + len(errors) == 40
    # cancelling again is harmless; a finished batch cannot be cancelled
    assert sim.client.batches.cancel(batch["id"]).status == "cancelled"
    sim.configure({"batch": {"in_progress_seconds": 0.1}})
    finished = run(sim, [line("x")])
    assert finished["status"] == "completed"
    with pytest.raises(openai.ConflictError) as info:
        sim.client.batches.cancel(finished["id"])
    validate(info.value.response.json(), "ErrorResponse")


def test_cancel_while_validating(sim: Sim) -> None:
    sim.configure({"batch": {"validating_seconds": 30}})
    batch = create(sim, upload(sim, [line("a")]))
    assert sim.client.batches.cancel(batch["id"]).status == "cancelling"
    done = wait_for(sim, batch["id"], TERMINAL)
    assert done["status"] == "cancelled"
    assert "output_file_id" not in done and "in_progress_at" not in done


def test_enqueued_token_limit(sim: Sim) -> None:
    long_text = "x" * 400  # ~100 prompt tokens a line
    sim.configure({"batch": {"enqueued_token_limit": 150}})
    too_big = run(sim, [line("a", long_text), line("b", long_text)])
    assert too_big["status"] == "failed"
    assert too_big["errors"]["data"][0]["code"] == "token_limit_exceeded"

    sim.configure({"batch": {"enqueued_token_limit": 300, "in_progress_seconds": 30}})
    first = run(sim, [line("a", long_text), line("b", long_text)], statuses={"in_progress", *TERMINAL})
    assert first["status"] == "in_progress"
    second = run(sim, [line("c", long_text), line("d", long_text)])
    assert second["status"] == "failed"
    assert second["errors"]["data"][0]["code"] == "token_limit_exceeded"
    assert "gpt-4o-mini" in second["errors"]["data"][0]["message"]
    sim.client.batches.cancel(first["id"])
    wait_for(sim, first["id"], TERMINAL)
    third = run(sim, [line("e", long_text), line("f", long_text)], statuses={"in_progress", *TERMINAL})
    assert third["status"] == "in_progress"  # the cancelled batch no longer counts
    sim.client.batches.cancel(third["id"])
    wait_for(sim, third["id"], TERMINAL)


def test_list_paging(sim: Sim) -> None:
    ids = [create(sim, upload(sim, [line("a")]))["id"] for _ in range(5)]
    newest_first = list(reversed(ids))
    page = sim.http.get("/v1/batches", params={"limit": 2}).json()
    validate(page, "ListBatchesResponse")
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[1])
    page2 = sim.http.get("/v1/batches", params={"limit": 2, "after": page["last_id"]}).json()
    validate(page2, "ListBatchesResponse")
    assert [b["id"] for b in page2["data"]] == newest_first[2:4]
    collected = [b.id for b in sim.client.batches.list(limit=2)]  # the SDK follows has_more/after
    assert collected[:5] == newest_first
    assert len(collected) == len(set(collected))
    assert sim.http.get("/v1/batches", params={"limit": 0}).status_code == 400
    unknown = sim.http.get("/v1/batches", params={"after": "batch_unknown"})
    assert unknown.status_code == 400
    validate(unknown.json(), "ErrorResponse")
    for batch_id in ids:
        wait_for(sim, batch_id, TERMINAL)


def test_files_api(sim: Sim) -> None:
    content = jsonl([line("a"), line("b")])
    file_id = upload(sim, [line("a"), line("b")])
    assert sim.client.files.retrieve(file_id).bytes == len(content)
    assert sim.client.files.content(file_id).content == content
    deleted = sim.http.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200
    validate(deleted.json(), "DeleteFileResponse")
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    with pytest.raises(openai.NotFoundError) as info:
        sim.client.files.retrieve(file_id)
    validate(info.value.response.json(), "ErrorResponse")
    files = {"file": ("input.jsonl", content, "application/jsonl")}
    no_purpose = sim.http.post("/v1/files", files=files)
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    wrong_purpose = sim.http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert wrong_purpose.status_code == 400
    not_jsonl = sim.http.post("/v1/files", files={"file": ("input.txt", content)}, data={"purpose": "batch"})
    assert not_jsonl.status_code == 400
    no_file = sim.http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    for bad in (no_purpose, wrong_purpose, not_jsonl, no_file):
        validate(bad.json(), "ErrorResponse")
    assert sim.stats()["files_created"] == 1


def test_create_batch_errors(sim: Sim) -> None:
    file_id = upload(sim, [line("a")])
    cases = [
        ({"input_file_id": "file-missing", "endpoint": ENDPOINT, "completion_window": "24h"}, 404),
        ({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}, 400),
        ({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "48h"}, 400),
        ({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"k": 1}}, 400),
        ({"endpoint": ENDPOINT, "completion_window": "24h"}, 400),
    ]
    for payload, status in cases:
        response = sim.http.post("/v1/batches", json=payload)
        assert response.status_code == status, payload
        validate(response.json(), "ErrorResponse")
    with pytest.raises(openai.NotFoundError):
        sim.client.batches.retrieve("batch_missing")
    assert sim.stats()["batches_created"] == 0


def test_fifty_thousand_lines(sim: Sim) -> None:
    sim.configure({"batch": {"validating_seconds": 0, "in_progress_seconds": 0, "finalizing_seconds": 0}})
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": ["billing", "account", "bug"]}},
        "required": ["label"]}}}
    lines = []
    for i in range(50_000):
        body = {"model": "gpt-4o-mini", "response_format": schema, "messages": [
            {"role": "system", "content": "Route the support ticket."},
            {"role": "user", "content": f"Ticket {i}: the export button does nothing"}]}
        lines.append({"custom_id": f"task-{i}", "method": "POST", "url": ENDPOINT, "body": body})
    file_id = upload(sim, lines)
    batch = create(sim, file_id)
    done = wait_for(sim, batch["id"], TERMINAL, timeout=60)  # a deadline to fail on, not a speed claim
    assert done["status"] == "completed", done.get("errors")
    assert done["request_counts"] == {"total": 50_000, "completed": 50_000, "failed": 0}
    assert len(sim.client.files.content(done["output_file_id"]).text.splitlines()) == 50_000
    over = run(sim, [*lines, {**lines[0], "custom_id": "one-more"}])
    assert over["status"] == "failed" and over["errors"]["data"][0]["code"] == "too_many_tasks"
    assert sim.stats()["batch_lines"] == 100_001
