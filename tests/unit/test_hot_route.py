"""The hot route: `POST /v1/chat/completions` goes down its own chain, everything else (other methods,
other paths, other scope types) down the framework's stack; and what the chain answers to what can go
wrong before a provider call — no key, a body over the limit, bytes that are not JSON, a NUL in a
header, an unexpected error — is what the full stack answers, status, body and content type alike."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from tierbatch.api.errors import install_error_handlers
from tierbatch.api.hot_route import HotRoute, install_hot_route
from tierbatch.api.limits import CHAT_BODY_BYTES, install_input_guard, route_limits
from tierbatch.api.routes import openai_chat
from tierbatch.openai_batches.files import FileLimits

pytestmark = pytest.mark.anyio


class Recording:
    def __init__(self, name: str, seen: list[tuple[str, str, str]]) -> None:
        self.name = name
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append((self.name, scope.get("method", ""), scope["path"]))


@pytest.mark.parametrize(("scope_type", "method", "path", "expected"), [
    ("http", "POST", "/v1/chat/completions", "hot"),
    ("http", "GET", "/v1/chat/completions", "full"),
    ("http", "POST", "/v1/chat/completions/", "full"),
    ("http", "POST", "/v1/completions", "full"),
    ("http", "POST", "/v1/batches", "full"),
    ("websocket", "GET", "/v1/chat/completions", "full"),
])
async def test_only_posts_to_the_chat_path_take_the_hot_chain(scope_type: str, method: str, path: str,
                                                               expected: str) -> None:
    seen: list[tuple[str, str, str]] = []
    app = FastAPI()
    route = HotRoute(app, Recording("full", seen), Recording("hot", seen))
    scope: dict[str, Any] = {"type": scope_type, "method": method, "path": path}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    await route(scope, receive, send)
    assert seen == [(expected, method, path)]
    assert (scope.get("app") is app) == (expected == "hot")


def build(hot: bool) -> FastAPI:
    """The app's surface around the chat route; its context is a bare object, so a request that gets past
    the checks fails on it (an unexpected error: 500)."""
    app = FastAPI()
    app.state.ctx = object()
    install_error_handlers(app)
    install_input_guard(app, FileLimits())
    app.include_router(openai_chat.router)
    if hot:
        install_hot_route(app, route_limits(FileLimits()))
    return app


KEY = {"authorization": "Bearer sk-" + "a" * 40, "content-type": "application/json"}
CASES: dict[str, tuple[dict[str, str], bytes]] = {
    "no key": ({"content-type": "application/json"}, b'{"model": "gpt-4o-mini", "messages": []}'),
    "not a bearer key": ({"authorization": "Basic abc", "content-type": "application/json"}, b"{}"),
    "over the limit": ({**KEY, "content-length": str(CHAT_BODY_BYTES + 1)}, b"{}"),
    "not JSON": (KEY, b'{"model": '),
    "NUL in a string": (KEY, b'{"model": "gpt\\u0000", "messages": []}'),
    "NUL in a header": ({**KEY, "x-client": "a\x00b"}, b"{}"),
    "unexpected error": (KEY, b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'),
}


async def answer(app: FastAPI, headers: dict[str, str], body: bytes) -> tuple[int, str, Any]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/chat/completions", content=body, headers=headers)
    return response.status_code, response.headers.get("content-type", ""), response.json()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_hot_chain_answers_as_the_full_stack(case: str) -> None:
    headers, body = CASES[case]
    through_stack = await answer(build(hot=False), headers, body)
    through_hot_route = await answer(build(hot=True), headers, body)
    assert through_hot_route == through_stack
    expected_status = {"no key": 401, "not a bearer key": 401, "over the limit": 413, "not JSON": 400,
                       "NUL in a string": 400, "NUL in a header": 400, "unexpected error": 500}[case]
    assert through_hot_route[0] == expected_status
    assert through_hot_route[1] == "application/json"
    assert set(through_hot_route[2]["error"]) >= {"message", "type"}  # OpenAI's error shape
