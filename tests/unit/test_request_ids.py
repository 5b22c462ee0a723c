"""Request ids: a sane client id is kept, anything else replaced; every answer (route, error handler,
input guard, 500, stream) carries it; the access line names method, path, status and the id.
Unknown URLs under /v1 answer in OpenAI's shape with a bounded, printable message."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tests.support.openapi import validate
from tierbatch.api.errors import install_error_handlers
from tierbatch.api.limits import InputGuard, RouteLimit
from tierbatch.api.request_ids import AccessLines, install_request_ids, sane_request_id
from tierbatch.base.errors import NotFound
from tierbatch.base.logs import JsonFormatter, TextFormatter, request_id_var

pytestmark = pytest.mark.anyio

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("value", [b"my-id-123", b"a", b"x" * 128, b"req_01HZ:abc/def+g=@host.example",
                                   b"00000000-0000-4000-8000-000000000000"])
def test_sane_ids_are_kept(value: bytes) -> None:
    assert sane_request_id(value) == value.decode()


@pytest.mark.parametrize("value", [None, b"", b"x" * 129, b"bad id", b"id\r\nx-injected: 1", b"id\x00",
                                   "caf\u00e9".encode(), b"<script>", b'"quoted"', b"semi;colon", b"tab\tid"])
def test_other_ids_are_refused(value: bytes | None) -> None:
    assert sane_request_id(value) is None


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access() -> Iterator[tuple[logging.Logger, Recorder]]:
    logger = logging.getLogger(f"test.access.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    recorder = Recorder()
    logger.addHandler(recorder)
    yield logger, recorder
    logger.removeHandler(recorder)


seen_ids: list[str | None] = []


def build_app(access: logging.Logger | AccessLines) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InputGuard, limits=(RouteLimit("POST", re.compile("/v1/small"), 10, "json"),))
    install_request_ids(app, access if isinstance(access, AccessLines) else AccessLines(access, delay_seconds=0))

    @app.get("/v1/ok")
    def ok() -> dict[str, str | None]:
        seen_ids.append(request_id_var.get())  # a sync route runs on a worker thread: the id follows it
        return {"id": request_id_var.get()}

    @app.post("/v1/small")
    def small() -> dict[str, str]:
        return {}

    @app.post("/v1/chat/completions")
    def chat() -> None:
        raise NotFound("no such model")

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield f"data: {request_id_var.get()}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-tierbatch-task-id": "0b5c-task"})

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_a_sane_id_is_echoed_and_logged(access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    async with client(build_app(logger)) as http:
        response = await http.get("/v1/ok", params={"secret": "s3"}, headers={"x-request-id": "my-id-123"})
    assert response.headers["x-request-id"] == "my-id-123"
    assert response.json() == {"id": "my-id-123"}
    line = json.loads(JsonFormatter().format(recorder.records[-1]))
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/ok", 200)
    assert line["request_id"] == "my-id-123"  # given to the record, not read from the context
    assert "s3" not in json.dumps(line)  # no query string
    assert isinstance(line["duration_ms"], float)


async def test_access_lines_go_out_in_a_group_after_the_delay_each_dated_when_its_request_ended(
        access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    lines = AccessLines(logger, delay_seconds=1.0)
    ended: list[tuple[float, float]] = []
    async with client(build_app(lines)) as http:
        for n in range(3):
            before = time.time()
            await http.get("/v1/ok", headers={"x-request-id": f"grouped-{n}"})
            ended.append((before, time.time()))
            await anyio.sleep(0.02)
        assert recorder.records == []  # kept: the first request ended less than a second ago
        deadline = time.monotonic() + 5
        while len(recorder.records) < 3 and time.monotonic() < deadline:
            await anyio.sleep(0.02)
    assert [r.__dict__["request_id"] for r in recorder.records] == ["grouped-0", "grouped-1", "grouped-2"]
    for r, (before, after) in zip(recorder.records, ended, strict=True):
        assert before <= r.created <= after
    # made after its request, the text line still names the request's id
    assert "[request_id=grouped-2] GET /v1/ok 200" in TextFormatter().format(recorder.records[-1])


async def test_flushing_hands_over_the_kept_lines_at_once(access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    lines = AccessLines(logger, delay_seconds=60)
    async with client(build_app(lines)) as http:
        await http.get("/v1/ok", headers={"x-request-id": "flushed-1"})
        await http.get("/v1/nope", headers={"x-request-id": "flushed-2"})
        assert recorder.records == []
        lines.flush()
    assert [(r.__dict__["request_id"], r.__dict__["status"]) for r in recorder.records] == [
        ("flushed-1", 200), ("flushed-2", 404)]


def test_lines_kept_when_a_loop_ended_go_out_with_the_next_loops(access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    lines = AccessLines(logger, delay_seconds=0.2)
    app = build_app(lines)

    async def one_request(request_id: str) -> None:
        async with client(app) as http:
            await http.get("/v1/ok", headers={"x-request-id": request_id})

    async def then_wait(request_id: str) -> None:
        await one_request(request_id)
        deadline = time.monotonic() + 5
        while len(recorder.records) < 2 and time.monotonic() < deadline:
            await anyio.sleep(0.02)

    anyio.run(one_request, "first-loop")  # this loop ends before its timer fires
    assert recorder.records == []
    anyio.run(then_wait, "second-loop")
    assert [r.__dict__["request_id"] for r in recorder.records] == ["first-loop", "second-loop"]


async def test_a_full_group_goes_without_waiting(access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    lines = AccessLines(logger, delay_seconds=60, max_kept=2)
    async with client(build_app(lines)) as http:
        for n in range(3):
            await http.get("/v1/ok", headers={"x-request-id": f"full-{n}"})
    assert [r.__dict__["request_id"] for r in recorder.records] == ["full-0", "full-1"]


async def test_a_hostile_id_is_replaced_on_every_kind_of_answer(access: tuple[logging.Logger, Recorder]) -> None:
    logger, recorder = access
    hostile = {"x-request-id": "evil\u00e9\x01".encode() + b"x" * 200}
    async with client(build_app(logger)) as http:
        answers = [await http.get("/v1/ok", headers=hostile),
                   await http.post("/v1/small", content=b'{"a": "0123456789"}', headers=hostile),  # guard 413
                   await http.post("/v1/chat/completions", json={}, headers=hostile),  # domain error 404
                   await http.get("/v1/boom", headers=hostile),  # 500
                   await http.get("/v1/nope", headers=hostile),  # no route
                   await http.get("/v1/stream", headers=hostile)]
    assert [a.status_code for a in answers] == [200, 413, 404, 500, 404, 200]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(HEX32.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert answers[-1].text == f"data: {ids[-1]}\n\n"  # the stream's body ran with the id
    logged = [(r.__dict__["path"], r.__dict__["status"]) for r in recorder.records]
    assert logged == [("/v1/ok", 200), ("/v1/small", 413), ("/v1/chat/completions", 404), ("/v1/boom", 500),
                      ("/v1/nope", 404), ("/v1/stream", 200)]
    assert recorder.records[-1].__dict__["task_id"] == "0b5c-task"
    assert all("evil" not in JsonFormatter().format(r) for r in recorder.records)


@pytest.mark.parametrize(("method", "path", "status", "code", "message"), [
    ("GET", "/v1/nope", 404, "unknown_url", "Invalid URL (GET /v1/nope)"),
    ("POST", "/v1/nope", 404, "unknown_url", "Invalid URL (POST /v1/nope)"),
    ("GET", "/v1/tasks/x/y/z", 404, "unknown_url", "Invalid URL (GET /v1/tasks/x/y/z)"),
    ("DELETE", "/v1/chat/completions", 405, "method_not_allowed",
     "Invalid method for URL (DELETE /v1/chat/completions): this URL takes POST"),
])
async def test_unknown_urls_under_v1_answer_like_openai(access: tuple[logging.Logger, Recorder], method: str,
                                                        path: str, status: int, code: str, message: str) -> None:
    async with client(build_app(access[0])) as http:
        response = await http.request(method, path)
    assert response.status_code == status
    body = response.json()
    validate(body, "ErrorResponse")
    assert body == {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


async def test_the_message_bounds_and_cleans_a_hostile_path(access: tuple[logging.Logger, Recorder]) -> None:
    async with client(build_app(access[0])) as http:
        response = await http.get("/v1/" + "a" * 5000 + "%1b%5B31m%0d%0a")
    message = response.json()["error"]["message"]
    assert response.status_code == 404
    assert len(message) < 300
    assert not any(ord(c) < 32 for c in message)


async def test_a_route_answer_of_404_keeps_its_own_message(access: tuple[logging.Logger, Recorder]) -> None:
    async with client(build_app(access[0])) as http:
        response = await http.post("/v1/chat/completions", json={})
    assert response.json()["error"]["message"] == "no such model"


async def test_unknown_paths_outside_v1_are_a_plain_json_404(access: tuple[logging.Logger, Recorder]) -> None:
    async with client(build_app(access[0])) as http:
        response = await http.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Not Found"
    assert HEX32.fullmatch(response.headers["x-request-id"])
