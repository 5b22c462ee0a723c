"""Request ids and the access log of the running API (JSON lines, TIERBATCH_LOG_FORMAT=json in the
stack), and OpenAI's answer for URLs and methods the API does not have, through the real `openai` SDK."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI

from tests.support.openapi import validate
from tests.support.procs import free_port, managed, python_module, wait_http_ok, wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

HEX32 = re.compile(r"[0-9a-f]{32}")


def api_lines(stack: Stack) -> list[dict[str, Any]]:
    return stack.processes["api"].json_log_lines()


def access_line(stack: Stack, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The API's access line of the request with this id (the line is written as the answer ends)."""
    def found() -> dict[str, Any] | None:
        lines = [line for line in api_lines(stack)
                 if line.get("logger") == "tierbatch.access" and line.get("request_id") == request_id]
        return lines[-1] if lines else None

    return wait_until(found, timeout, 0.05, f"the access line of request {request_id}")  # type: ignore[return-value]


@pytest.fixture
def tenant(stack: Stack) -> Iterator[tuple[str, httpx.Client]]:
    key = stack.new_tenant_key("request-ids")
    with stack.client(key) as client:
        yield key, client


def test_the_clients_id_is_echoed_and_logged_with_path_and_status(tenant: tuple[str, httpx.Client],
                                                                  stack: Stack) -> None:
    _, client = tenant
    request_id = f"my-id-123-{uuid.uuid4().hex[:8]}"
    response = client.get("/v1/tasks", params={"limit": 1}, headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    line = access_line(stack, request_id)
    assert (line["level"], line["method"], line["path"], line["status"]) == ("INFO", "GET", "/v1/tasks", 200)
    assert isinstance(line["duration_ms"], float) and line["ts"]
    assert "limit" not in line["message"]  # no query string


def test_without_a_header_the_api_makes_a_fresh_id_and_logs_it(tenant: tuple[str, httpx.Client],
                                                              stack: Stack) -> None:
    _, client = tenant
    first = client.get("/v1/models")
    second = client.get("/v1/models")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(HEX32.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert access_line(stack, ids[1])["path"] == "/v1/models"


@pytest.mark.parametrize("shape", [b"%s" + b"x" * 129, b"evil\t%s", "caf\u00e9-%s".encode(), b"evil %s",
                                   b"evil;%s"])
def test_a_hostile_id_is_replaced_not_echoed_nor_logged(stack: Stack, shape: bytes) -> None:
    # a marker of this run only: the session's log also holds other tests' long paths and odd bytes
    hostile = shape.replace(b"%s", uuid.uuid4().hex.encode())
    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        response = client.get("/healthz", headers={"x-request-id": hostile})
    replaced = response.headers["x-request-id"]
    assert HEX32.fullmatch(replaced)
    assert access_line(stack, replaced)["path"] == "/healthz"
    log = stack.processes["api"].log_path.read_bytes()  # type: ignore[union-attr]
    assert hostile not in log


def test_errors_carry_the_id_too(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        unauthenticated = client.get("/v1/tasks", headers={"x-request-id": "err-401"})
        guarded = client.get("/v1/tasks", params={"q": "a\x00b"}, headers={"x-request-id": "err-400"})
    assert (unauthenticated.status_code, unauthenticated.headers["x-request-id"]) == (401, "err-401")
    assert (guarded.status_code, guarded.headers["x-request-id"]) == (400, "err-400")  # the input guard's answer
    assert access_line(stack, "err-401")["status"] == 401
    assert access_line(stack, "err-400")["status"] == 400


def test_a_chat_completion_logs_its_request_and_task_but_not_the_prompt_or_the_key(
        tenant: tuple[str, httpx.Client], sim_reset: Stack) -> None:
    stack = sim_reset
    key, client = tenant
    marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Classify {marker}"}]}
    plain = client.post("/v1/chat/completions", json=body, headers={"x-request-id": "chat-1"})
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers={"x-request-id": "chat-2"})
    assert plain.status_code == 200 and streamed.status_code == 200, (plain.text, streamed.text)
    assert plain.headers["x-request-id"] == "chat-1" and streamed.headers["x-request-id"] == "chat-2"
    assert "data: [DONE]" in streamed.text
    for request_id, answer in (("chat-1", plain), ("chat-2", streamed)):
        line = access_line(stack, request_id)
        assert (line["path"], line["status"]) == ("/v1/chat/completions", 200)
        assert line["task_id"] == answer.headers["x-tierbatch-task-id"]
    log = stack.processes["api"].log_path.read_text()  # type: ignore[union-attr]
    assert marker not in log
    assert key not in log and key[10:] not in log  # neither the key nor its secret part


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/nope", 404, "unknown_url"),
    ("POST", "/v1/nope", 404, "unknown_url"),
    ("GET", "/v1/tasks/x/y/z", 404, "unknown_url"),
    ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
])
def test_unknown_urls_and_methods_answer_in_openais_shape(tenant: tuple[str, httpx.Client], method: str, path: str,
                                                          status: int, code: str) -> None:
    _, client = tenant
    response = client.request(method, path, headers={"x-request-id": f"url-{status}"})
    assert response.status_code == status
    body = response.json()
    validate(body, "ErrorResponse")
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, code)
    assert f"({method} {path})" in error["message"]
    assert response.headers["x-request-id"] == f"url-{status}"


def test_a_hostile_unknown_path_is_not_repeated_verbatim(tenant: tuple[str, httpx.Client]) -> None:
    _, client = tenant
    response = client.get("/v1/" + "a" * 3000 + "%1b%5B2J%0d%0aSet-Cookie:x")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert len(message) < 300 and not any(ord(c) < 32 for c in message)


def test_unknown_paths_outside_v1_are_a_json_404(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Not Found"


def test_the_openai_sdk_raises_not_found_with_the_message(tenant: tuple[str, httpx.Client],
                                                         openai_sdk: Callable[[str], OpenAI]) -> None:
    key, _ = tenant
    client = openai_sdk(key)
    with pytest.raises(openai.NotFoundError) as raised:
        client.post("/nope", cast_to=httpx.Response, body={})
    assert raised.value.status_code == 404
    assert raised.value.code == "unknown_url"
    assert "Invalid URL (POST /v1/nope)" in raised.value.message
    with pytest.raises(openai.NotFoundError) as raised_get:
        client.get("/nope", cast_to=httpx.Response)
    assert "Invalid URL (GET /v1/nope)" in raised_get.value.message


def worker_lines(stack: Stack, predicate: Callable[[dict[str, Any]], bool], what: str) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [line for line in stack.processes["worker"].json_log_lines() if predicate(line)]

    return wait_until(found, 30, 0.1, what)  # type: ignore[return-value]


def test_the_workers_lines_about_a_task_carry_its_id_and_not_its_prompt(sim_reset: Stack) -> None:
    stack = sim_reset
    failing = {"error_rate": 1.0, "error_status": 400}
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": failing, "gpt-4.1": failing}})
    marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    try:
        with stack.client(stack.new_tenant_key()) as client:
            accepted = client.post("/v1/tasks", json={"prompt": f"Plan {marker}", "tier": "complex"}).json()
            task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"}, timeout=60)
    finally:
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 0.0}, "gpt-4.1": {"error_rate": 0.0}}})
    assert task["status"] == "failed"
    lines = worker_lines(stack, lambda line: line.get("task_id") == accepted["id"], "the worker's line of the task")
    assert any("failed" in str(line["message"]) for line in lines), lines
    assert marker not in stack.processes["worker"].log_path.read_text()  # type: ignore[union-attr]


def test_the_workers_lines_about_a_batch_carry_its_id(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key()) as client:
        accepted = client.post("/v1/tasks", json={"prompt": "Label this", "tier": "light"}).json()
        task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"}, timeout=60)
    assert task["status"] == "succeeded" and task["mode"] == "batch", task
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT batch_id FROM tasks WHERE id = %s", (accepted["id"],)).fetchone()
    assert row is not None and row[0] is not None
    batch_id = str(row[0])
    lines = worker_lines(stack, lambda line: line.get("batch_id") == batch_id, "the worker's batch lines")
    assert any("submitted as" in str(line["message"]) for line in lines), lines


def test_the_log_format_flag_sets_the_format_of_the_process(stack: Stack, tmp_path: Path) -> None:
    env = {key: value for key, value in stack.env.items() if key != "TIERBATCH_LOG_FORMAT"}
    env["TIERBATCH_LOG_FORMAT"] = ""  # not inherited from the test's own environment either
    port = free_port()
    with managed(python_module("tierbatch.cli", "api", "--port", str(port), "--log-format", "json"), env=env,
                 log_path=tmp_path / "api-json.log") as json_api:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=json_api)
        request_id = httpx.get(f"http://127.0.0.1:{port}/healthz").headers["x-request-id"]
        wait_until(lambda: any(line.get("request_id") == request_id for line in json_api.json_log_lines()), 15,
                   0.05, "a JSON access line")
    text_port = free_port()
    with managed(python_module("tierbatch.cli", "api", "--port", str(text_port), "--log-format", "text"), env=env,
                 log_path=tmp_path / "api-text.log") as text_api:
        wait_http_ok(f"http://127.0.0.1:{text_port}/healthz", proc=text_api)
        request_id = httpx.get(f"http://127.0.0.1:{text_port}/healthz").headers["x-request-id"]
        wait_until(lambda: f"[request_id={request_id}] GET /healthz 200" in text_api.log_text(), 15, 0.05,
                   "a text access line")
        assert text_api.json_log_lines() == []
    refused = subprocess.run(python_module("tierbatch.cli", "api", "--log-format", "xml"), env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "--log-format" in refused.stderr
