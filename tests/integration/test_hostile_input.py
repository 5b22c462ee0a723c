"""Hostile bytes against the running API: NUL and lone surrogates anywhere, JSON nested without end,
bodies over the limit (declared and streamed). Each is a 4xx naming the field, in the surface's error
shape, answered before anything is stored or any provider is called."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.procs import free_port, python_module, wait_http_ok
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

OPENAI_KEYS = {"message", "type", "param", "code"}
TENANT_KEYS = {"type", "message", "param"}


def new_tenant(stack: Stack) -> tuple[str, str]:
    with stack.admin_client() as admin:
        created = admin.post("/v1/admin/tenants", json={"name": f"hostile-{uuid.uuid4().hex[:6]}"}).json()
    return str(created["id"]), str(created["api_key"])


def rows(stack: Stack, sql: str, *params: Any) -> int:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def tenant_tasks(stack: Stack, tenant_id: str) -> int:
    return rows(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s", tenant_id)


def provider_calls(stack: Stack) -> int:
    stats = stack.sim("GET", "/_sim/stats")
    return sum(stats["chat_calls"].values())


def error_of(response: httpx.Response, surface: str) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == (OPENAI_KEYS if surface == "openai" else TENANT_KEYS), error
    return error


CHAT_NUL = {"model": "smart-select", "messages": [{"role": "user", "content": "hello\u0000world"}]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_nul_in_a_chat_message_is_refused_before_the_provider_and_stores_nothing(
        sim_reset: Stack, stream: bool) -> None:
    stack = sim_reset
    tenant_id, key = new_tenant(stack)
    with stack.client(key) as client:
        answer = client.post("/v1/chat/completions", json={**CHAT_NUL, "stream": stream})
        surrogate = client.post("/v1/chat/completions", content=b'{"model": "smart-select", "stream": '
                                + json.dumps(stream).encode()
                                + b', "messages": [{"role": "user", "content": "x\\ud800"}]}')
    for response in (answer, surrogate):
        assert response.status_code == 400, response.text
        error = error_of(response, "openai")
        assert error["param"] == "messages[0].content"
        assert error["type"] == "invalid_request_error"
    assert provider_calls(stack) == 0
    assert tenant_tasks(stack, tenant_id) == 0
    assert rows(stack, "SELECT count(*) FROM ledger_entries WHERE tenant_id = %s", tenant_id) == 0


DEEP = b"[" * 100_000


@pytest.mark.parametrize(("method", "path", "surface"), [
    ("POST", "/v1/tasks", "tenant"),
    ("POST", "/v1/jobs", "tenant"),
    ("POST", "/v1/schedules", "tenant"),
    ("POST", "/v1/chat/completions", "openai"),
    ("POST", "/v1/batches", "openai"),
    ("PUT", "/v1/routes/classification", "tenant"),
])
def test_json_nested_without_end_is_a_400_not_a_crash(stack: Stack, method: str, path: str, surface: str) -> None:
    tenant_id, key = new_tenant(stack)
    with stack.client(key) as client:
        for body in (DEEP, b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 30_000):
            response = client.request(method, path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, (path, response.status_code, response.text[:300])
            error_of(response, surface)
        # the connection and the process are fine afterwards
        assert client.get("/v1/tasks").status_code == 200
    assert tenant_tasks(stack, tenant_id) == 0


def test_nul_in_task_fields_query_and_path_is_a_400_naming_the_field(stack: Stack) -> None:
    tenant_id, key = new_tenant(stack)
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/tasks", {"prompt": "classify\u0000this"}, "prompt"),
        ("POST", "/v1/tasks", {"prompt": "ok", "metadata": {"x": "a\u0000"}}, "metadata.x"),
        ("POST", "/v1/tasks", {"prompt": "ok", "metadata": {"x\u0000": "a"}}, "metadata.x\\x00"),
        ("POST", "/v1/tasks", {"prompt": "ok", "idempotency_key": "k\u0000"}, "idempotency_key"),
        ("POST", "/v1/tasks", {"tasks": [{"prompt": "fine"}, {"prompt": "\u0000"}]}, "tasks[1].prompt"),
        ("POST", "/v1/jobs", {"items": [{"id": "a", "text": "fine"}, {"id": "b\u0000", "text": "t"}]},
         "items[1].id"),
        ("POST", "/v1/schedules", {"name": "n\u0000", "cron": "* * * * *"}, "name"),
    ]
    with stack.client(key) as client:
        for method, path, body, param in cases:
            response = client.request(method, path, json=body)
            assert response.status_code == 400, (body, response.text)
            assert error_of(response, "tenant")["param"] == param, body
        listing = client.get("/v1/tasks", params={"status": "\u0000"})
        assert listing.status_code == 400 and error_of(listing, "tenant")["param"] == "status"
        typed = client.get("/v1/tasks?task_type=a%00b")
        assert typed.status_code == 400 and error_of(typed, "tenant")["param"] == "task_type"
        route = client.put("/v1/routes/a%00b", json={"tier": "light"})
        assert route.status_code == 400 and error_of(route, "tenant")["param"] == "task_type"
        job = client.get("/v1/jobs/%00")
        assert job.status_code == 400 and error_of(job, "tenant")["param"] == "job_id"
        files = client.get("/v1/files?after=%00")
        assert files.status_code == 400 and error_of(files, "openai")["param"] == "after"
        assert client.get("/v1/tasks").status_code == 200
    assert tenant_tasks(stack, tenant_id) == 0
    assert rows(stack, "SELECT count(*) FROM schedules WHERE tenant_id = %s", tenant_id) == 0


def test_a_nul_line_in_an_ndjson_upload_or_a_batch_file_names_the_line(sim_reset: Stack) -> None:
    stack = sim_reset
    tenant_id, key = new_tenant(stack)
    with stack.client(key) as client:
        job = client.post("/v1/jobs", json={"tier": "light", "items": [{"id": "first", "text": "hello"}]})
        assert job.status_code == 202, job.text
        tasks_before = tenant_tasks(stack, tenant_id)
        ndjson = b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "bad\\u0000"}\n'
        upload = client.post(f"/v1/jobs/{job.json()['id']}/items", content=ndjson,
                             headers={"content-type": "application/x-ndjson"})
        assert upload.status_code == 400, upload.text
        error = error_of(upload, "tenant")
        assert error["param"] == "text" and error["message"].startswith("line 2:")
        deep = client.post(f"/v1/jobs/{job.json()['id']}/items", content=b'{"id": "c", "text": "x"}\n' + DEEP,
                           headers={"content-type": "application/x-ndjson"})
        assert deep.status_code == 400 and error_of(deep, "tenant")["message"].startswith("line 2:")
        assert tenant_tasks(stack, tenant_id) == tasks_before  # all lines or none

        files_before = rows(stack, "SELECT count(*) FROM files WHERE tenant_id = %s", tenant_id)
        good = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "smart-select", "messages": [{"role": "user", "content": "hi"}]}}
        bad = {**good, "custom_id": "r2",
               "body": {**good["body"], "messages": [{"role": "user", "content": "h\u0000i"}]}}
        content = (json.dumps(good) + "\n" + json.dumps(bad) + "\n").encode()
        stored = client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
        assert stored.status_code == 400, stored.text
        error = error_of(stored, "openai")
        assert error["message"].startswith("Line 2:") and error["param"] == "body.messages[0].content"
        assert rows(stack, "SELECT count(*) FROM files WHERE tenant_id = %s", tenant_id) == files_before
    assert provider_calls(stack) <= 1  # at most the first job's single item; never the refused lines


# --- body limits, proven on the wire ------------------------------------------------------------------


def raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode("latin-1"))
    return sock


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one response (status, headers, body by Content-Length) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


@pytest.mark.parametrize(("path", "surface"), [("/v1/schedules", "tenant"), ("/v1/batches", "openai"),
                                               ("/v1/tasks", "tenant"), ("/v1/admin/tenants", "tenant")])
def test_a_declared_80_mb_body_is_413_before_a_byte_of_it_is_sent(stack: Stack, path: str, surface: str) -> None:
    _, key = new_tenant(stack)
    sock = raw_request(stack.api_port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {80 * 1024 * 1024}\r\n\r\n")
    try:
        # nothing of the body has been sent: the answer comes from the headers alone
        status, headers, body = read_response(sock)
    finally:
        sock.close()
    assert status == 413
    error = json.loads(body)["error"]
    assert set(error) == (OPENAI_KEYS if surface == "openai" else TENANT_KEYS)
    if surface == "openai":
        assert error["code"] == "request_too_large"
    assert headers.get("connection") == "close"


def stream_until_answered(port: int, head: str, chunk: bytes, most: int) -> tuple[int, int, bytes]:
    """Send a chunked body until the server answers; (status, bytes sent, body). Never sends more than `most`."""
    sock = raw_request(port, head)
    sent = 0
    try:
        while sent < most:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, _, body = read_response(sock)
        return status, sent, body
    finally:
        sock.close()


def send_until_answered(port: int, head: str, first: bytes, then: bytes, most: int) -> tuple[int, int, bytes]:
    """Send `first`, then `then` again and again as a chunked body that never ends, until the server answers;
    (status, bytes sent, body). Never sends more than `most`."""
    sock = raw_request(port, head)
    sent = 0
    try:
        piece = first
        while sent < most:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            piece = then
        status, _, body = read_response(sock, timeout=30)
        return status, sent, body
    finally:
        sock.close()


def ndjson_lines(count: int, prefix: str) -> bytes:
    return b"".join(b'{"id": "%s-%d", "text": "fine"}\n' % (prefix.encode(), i) for i in range(count))


@pytest.mark.parametrize(("case", "bad", "status", "line", "param"), [
    ("invalid JSON", b'{"id": "x", "text": oops}\n', 400, 1002, None),
    ("a NUL", b'{"id": "x", "text": "a\\u0000b"}\n', 400, 1002, "text"),
    ("a line too long", b'{"id": "x", "text": "' + b"y" * (3 * 1024 * 1024), 413, 1002, None),
])
def test_an_ndjson_job_is_refused_while_its_body_still_arrives_naming_the_line(
        stack: Stack, case: str, bad: bytes, status: int, line: int, param: str | None) -> None:
    """A streamed job body is read as it comes: the bad line is answered long before the body would end
    (it never does), and nothing of it, nor the job, is stored."""
    tenant_id, key = new_tenant(stack)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
    first = b'{"name": "hostile", "tier": "light"}\n' + ndjson_lines(1000, "ok") + bad
    most = 200 * 1024 * 1024
    answered, sent, body = send_until_answered(stack.api_port, head, first, ndjson_lines(2000, "later"), most)
    assert answered == status, (case, body[:300])
    assert sent < 40 * 1024 * 1024, case  # answered while the body was still arriving, not at its end
    error = json.loads(body)["error"]
    assert set(error) == TENANT_KEYS
    assert error["message"].startswith(f"line {line}:"), (case, error)
    assert error["param"] == param, (case, error)
    assert tenant_tasks(stack, tenant_id) == 0
    assert rows(stack, "SELECT count(*) FROM jobs WHERE tenant_id = %s", tenant_id) == 0


@pytest.fixture
def small_files_api(stack: Stack) -> Iterator[int]:
    """A second API process whose batch files may hold at most 64 KiB."""
    port = free_port()
    proc = stack._start("api-hostile-files",
                        python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)),
                        {"TIERBATCH_BATCH_FILE_MAX_BYTES": str(64 * 1024)})
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield port
    finally:
        proc.stop()


def test_streamed_bodies_are_cut_at_the_limit_while_they_arrive(stack: Stack, small_files_api: int) -> None:
    tenant_id, key = new_tenant(stack)
    files_before = rows(stack, "SELECT count(*) FROM files WHERE tenant_id = %s", tenant_id)
    boundary = "hostileboundary"
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n")
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
    sock = raw_request(small_files_api, head)
    sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
    sent = 0
    line = (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "smart-select", "messages": [{"role": "user", "content": "y" * 900}]}})
            + "\n").encode() * 16
    deadline = time.monotonic() + 30
    try:
        while sent < 50 * 1024 * 1024 and time.monotonic() < deadline:
            if select.select([sock], [], [], 0)[0]:
                break
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            sent += len(line)
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "file_too_large"
    # cut near 64 KiB (plus the multipart allowance and what was in flight), far from the 50 MB offered
    assert sent < 8 * 1024 * 1024, sent
    assert rows(stack, "SELECT count(*) FROM files WHERE tenant_id = %s", tenant_id) == files_before

    # a JSON route without Content-Length: counted as it arrives, cut at its 4 MiB limit
    status, sent, body = stream_until_answered(
        stack.api_port, f"POST /v1/schedules HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", b" " * 65536, 64 * 1024 * 1024)
    assert status == 413, body
    assert sent < 16 * 1024 * 1024, sent
    assert set(json.loads(body)["error"]) == TENANT_KEYS


def test_a_nul_in_a_header_never_reaches_a_provider(sim_reset: Stack) -> None:
    stack = sim_reset
    tenant_id, key = new_tenant(stack)
    body = json.dumps({"model": "smart-select", "messages": [{"role": "user", "content": "hi"}]})
    sock = raw_request(stack.api_port, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: Bearer {key}\r\nX-Task-Type: a\x00b\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}")
    try:
        status, _, _ = read_response(sock)
    finally:
        sock.close()
    assert status == 400
    assert provider_calls(stack) == 0
    assert tenant_tasks(stack, tenant_id) == 0
