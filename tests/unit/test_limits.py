"""The input guard in front of every route, on a small app (no services): limits, NUL, nesting, shapes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.types import Message

from tierbatch.api.errors import install_error_handlers
from tierbatch.api.limits import DEFAULT_BODY_BYTES, install_input_guard, parsed_json
from tierbatch.openai_batches.files import FileLimits


def make_app() -> tuple[FastAPI, list[Any]]:
    app = FastAPI()
    seen: list[Any] = []
    install_error_handlers(app)
    install_input_guard(app, FileLimits(max_bytes=1000, max_lines=10))

    @app.post("/v1/tasks")
    async def tasks(request: Request) -> dict[str, Any]:
        seen.append(parsed_json(request, await request.body(), lambda raw: "unparsed"))
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        seen.append(parsed_json(request, await request.body(), lambda raw: "unparsed"))
        return {"ok": True}

    @app.post("/v1/files")
    async def files(request: Request) -> dict[str, Any]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        seen.append(size)
        return {"size": size}

    @app.put("/v1/routes/{task_type}")
    def route(task_type: str) -> dict[str, str]:
        seen.append(task_type)
        return {"task_type": task_type}

    @app.get("/v1/tasks")
    def listing(status: str | None = None) -> dict[str, Any]:
        seen.append(status)
        return {"status": status}

    return app, seen


@pytest.fixture
def app() -> tuple[FastAPI, list[Any]]:
    return make_app()


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def call_raw(app: FastAPI, method: str, path: str, headers: list[tuple[bytes, bytes]],
                   chunks: list[bytes]) -> tuple[int, list[Message], int]:
    """Drive the ASGI app by hand: how many body chunks did it pull before answering?"""
    pulled = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": headers, "scheme": "http",
             "server": ("test", 80), "client": ("127.0.0.1", 1), "root_path": "", "app": app}
    await app(scope, receive, send)
    return sent[0]["status"], sent, pulled


@pytest.mark.anyio
async def test_content_length_over_the_limit_is_413_before_a_byte_is_read(app: tuple[FastAPI, list[Any]]) -> None:
    status, sent, pulled = await call_raw(app[0], "POST", "/v1/tasks",
                                          [(b"content-length", str(80 * 1024 * 1024).encode())], [b"x" * 10])
    assert status == 413 and pulled == 0 and app[1] == []
    body = sent[1]["body"]
    assert b'"request_too_large"' in body and b'"type"' in body
    status, sent, pulled = await call_raw(app[0], "POST", "/v1/schedules",
                                          [(b"content-length", str(DEFAULT_BODY_BYTES + 1).encode())], [b"x"])
    assert status == 413 and pulled == 0


@pytest.mark.anyio
async def test_a_body_without_length_is_cut_at_the_limit(app: tuple[FastAPI, list[Any]]) -> None:
    chunk = b"x" * (1024 * 1024)
    chunks = [chunk] * 10
    status, _, pulled = await call_raw(app[0], "POST", "/v1/schedules", [], chunks)
    assert status == 413 and pulled == 5  # 4 MiB limit: the fifth chunk passes it, the rest is never read
    # a streamed route (multipart upload) is counted as the route reads it, and cut there
    status, sent, pulled = await call_raw(app[0], "POST", "/v1/files", [], [b"y" * 40_000] * 5)
    assert status == 413 and pulled == 2 and app[1] == []
    assert b'"file_too_large"' in sent[1]["body"]


@pytest.mark.anyio
async def test_under_the_limit_the_routes_get_the_body_parsed_once(app: tuple[FastAPI, list[Any]]) -> None:
    async with client(app[0]) as http:
        assert (await http.post("/v1/tasks", content=b'{"prompt": "hi"}')).status_code == 200
        assert (await http.post("/v1/files", content=b"z" * 500)).json() == {"size": 500}
    assert app[1] == [{"prompt": "hi"}, 500]


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "surface"), [("/v1/tasks", "tenant"), ("/v1/chat/completions", "openai")])
async def test_nesting_and_nul_are_400_in_the_surface_shape(app: tuple[FastAPI, list[Any]], path: str,
                                                           surface: str) -> None:
    async with client(app[0]) as http:
        deep = await http.post(path, content=b"[" * 100_000)
        nul = await http.post(path, content=b'{"messages": [{"role": "user", "content": "a\\u0000"}]}')
        bad = await http.post(path, content=b"{nope")
    assert app[1] == []
    for response in (deep, nul, bad):
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == ({"message", "type", "param", "code"} if surface == "openai"
                              else {"type", "message", "param"})
    assert nul.json()["error"]["param"] == "messages[0].content"


@pytest.mark.anyio
async def test_nul_in_query_and_path_names_the_parameter(app: tuple[FastAPI, list[Any]]) -> None:
    async with client(app[0]) as http:
        query = await http.get("/v1/tasks?status=%00")
        path = await http.put("/v1/routes/a%00b", json={"tier": "light"})
        fine = await http.get("/v1/tasks?status=queued")
    assert query.status_code == 400 and query.json()["error"]["param"] == "status"
    assert path.status_code == 400 and path.json()["error"]["param"] == "task_type"
    assert fine.status_code == 200
    assert app[1] == ["queued"]
