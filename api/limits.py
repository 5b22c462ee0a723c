"""One boundary for every request's bytes, before any route (and so any provider call) sees them.

`InputGuard` is an ASGI middleware that, on every route:

- refuses a NUL (or lone surrogate) in a path parameter, a query parameter or a header value: 400
  naming it (the path parameter by matching the app's route templates, only when the path has one);
- refuses a `Content-Length` over the route's limit with 413 at once, before reading a byte of the
  body, and counts a body without one as it arrives, cutting it at the limit with 413;
- for JSON routes, reads the body (within the limit), parses it once with orjson and checks it
  (`tierbatch.base.inputs.loads_checked`: nesting, NUL and lone surrogates in any string or key, 400 naming
  the dotted field); the parsed value is kept in the request state for the route (`parsed_json`),
  so the hot path parses once;
- leaves streamed bodies (multipart uploads, NDJSON items) streamed: they are counted chunk by chunk
  and the route's reader gets `BodyTooLarge` (413) the moment the limit is passed.

Errors leave in the shape of the surface (api/errors.py): OpenAI's on the OpenAI paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierbatch.api.errors import OPENAI_PATHS, error_response, openai_error_response, refused_response
from tierbatch.base.errors import InvalidInput
from tierbatch.base.inputs import NotJson, check_text, dotted, loads_checked, unstorable
from tierbatch.openai_batches.files import FileLimits

MiB = 1024 * 1024
# The limits of the routes (a route not named here has DEFAULT_BODY_BYTES).
DEFAULT_BODY_BYTES = 4 * MiB
TASKS_BODY_BYTES = 64 * MiB  # up to max_tasks_per_request prompts of up to max_prompt_bytes
CHAT_BODY_BYTES = 64 * MiB
# 100,000 items of a few hundred bytes fit easily; bigger jobs go in several requests with one name.
JOBS_BODY_BYTES = 128 * MiB
# An NDJSON job is streamed (never held whole): a few million items of a few hundred bytes in one request.
JOBS_NDJSON_BODY_BYTES = 1024 * MiB
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/ndjson")
DASHBOARD_FORM_BYTES = 16 * 1024
# multipart framing around the file: part headers and the small `purpose` field
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# parsed on a worker thread above this size, so a big body does not hold the event loop
THREAD_PARSE_BYTES = 1 * MiB
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
STATE_KEY = "tierbatch_json"


class BodyTooLarge(StarletteHTTPException):
    """A streamed body passed its route's limit while being read."""

    def __init__(self, limit: RouteLimit) -> None:
        super().__init__(413, limit.too_large_message())
        self.limit = limit


@dataclass(frozen=True, slots=True)
class RouteLimit:
    method: str
    pattern: re.Pattern[str]
    max_bytes: int
    # json: read whole within the limit and checked here; stream: counted as the route reads it
    body: Literal["json", "stream"]
    openai_code: str = "request_too_large"
    advice: str = ""
    # content types this route streams (never read whole) with their own limit, e.g. an NDJSON job
    streamed_types: tuple[str, ...] = ()
    streamed_max_bytes: int = 0

    def too_large_message(self) -> str:
        return f"the request body is over this route's limit of {self.max_bytes:,} bytes{self.advice}"

    def for_content_type(self, content_type: str) -> RouteLimit:
        if content_type not in self.streamed_types:
            return self
        return replace(self, max_bytes=self.streamed_max_bytes, body="stream", streamed_types=(), advice="")


def route_limits(files: FileLimits) -> tuple[RouteLimit, ...]:
    """Every route's body limit; the first match wins, anything else gets DEFAULT_BODY_BYTES (JSON)."""
    several = "; send the items in several requests with the same name"
    return (
        RouteLimit("POST", re.compile(r"/v1/chat/completions"), CHAT_BODY_BYTES, "json"),
        RouteLimit("POST", re.compile(r"/v1/tasks"), TASKS_BODY_BYTES, "json"),
        RouteLimit("POST", re.compile(r"/v1/jobs"), JOBS_BODY_BYTES, "json", advice=several + ", or as NDJSON",
                   streamed_types=NDJSON_TYPES, streamed_max_bytes=JOBS_NDJSON_BODY_BYTES),
        RouteLimit("POST", re.compile(r"/v1/jobs/[^/]+/items"), JOBS_NDJSON_BODY_BYTES, "stream", advice=several),
        RouteLimit("POST", re.compile(r"/v1/files"), files.max_bytes + MULTIPART_OVERHEAD_BYTES, "stream",
                   openai_code="file_too_large"),
        # the dashboard's forms (urlencoded, a few short fields): read and checked by the dashboard
        RouteLimit("POST", re.compile(r"/dashboard/.*"), DASHBOARD_FORM_BYTES, "stream"),
    )


def default_limit(method: str) -> RouteLimit:
    return RouteLimit(method, re.compile(".*"), DEFAULT_BODY_BYTES, "json" if method in BODY_METHODS else "stream")


def install_input_guard(app: FastAPI, files: FileLimits) -> None:
    """The guard around every route, and the answer to a streamed body cut at its limit."""
    app.add_middleware(InputGuard, limits=route_limits(files), templates=lambda: app.openapi()["paths"])

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return InputGuard.too_large(exc.limit, is_openai(request.url.path))


def parsed_json(request: Request, raw: bytes, parse: Callable[[bytes], Any]) -> Any:
    """The body as the guard parsed and checked it; `parse(raw)` when it did not (empty body, no guard)."""
    kept = request.scope.get("state", {}).get(STATE_KEY)
    if kept is not None:
        return kept[0]
    return parse(raw)


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


class InputGuard:
    def __init__(self, app: ASGIApp, limits: Sequence[RouteLimit],
                 templates: Callable[[], Iterable[str]] = tuple) -> None:
        self.app = app
        self.limits = tuple(limits)
        self.templates = templates  # the route paths, e.g. /v1/routes/{task_type}
        self._defaults = {method: default_limit(method) for method in
                          ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}

    def limit_for(self, method: str, path: str) -> RouteLimit:
        for limit in self.limits:
            if limit.method == method and limit.pattern.fullmatch(path):
                return limit
        return self._defaults.get(method) or default_limit(method)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        openai = is_openai(path)
        try:
            self.check_target(scope)
        except InvalidInput as exc:
            await self.invalid(exc, openai)(scope, receive, send)
            return
        method: str = scope["method"]
        limit = self.limit_for(method, path).for_content_type(_content_type(scope))
        declared = _content_length(scope)
        if declared is not None:
            if not declared.isdigit():
                await self.invalid(InvalidInput("Content-Length is not a number", param="Content-Length"),
                                   openai)(scope, receive, send)
                return
            if int(declared) > limit.max_bytes:
                await self.too_large(limit, openai)(scope, receive, send)
                return
        if limit.body == "stream" or method not in BODY_METHODS:
            await self.app(scope, _counting(receive, limit), send)
            return
        body = await _read_within(receive, limit.max_bytes)
        if body is None:
            await self.too_large(limit, openai)(scope, receive, send)
            return
        if body is _DISCONNECTED:
            return
        if body:
            try:
                value = (await anyio.to_thread.run_sync(loads_checked, body) if len(body) > THREAD_PARSE_BYTES
                         else loads_checked(body))
            except InvalidInput as exc:
                await self.invalid(exc, openai)(scope, receive, send)
                return
            scope.setdefault("state", {})[STATE_KEY] = (value,)
        await self.app(scope, _replay(body, receive), send)

    # --- the path, the query and the headers -------------------------------------------------------

    def check_target(self, scope: Scope) -> None:
        path: str = scope["path"]
        if unstorable(path):
            raise self._path_error(path)
        query: bytes = scope.get("query_string", b"")
        if b"%00" in query or b"\x00" in query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                param = dotted([name])
                if unstorable(name):
                    raise InvalidInput(f"the query parameter {param!r} has a NUL in its name", param=param)
                check_text(value, param)
        for name, value in scope["headers"]:
            if b"\x00" in value:
                header = name.decode("latin-1")
                raise InvalidInput(f"the header {header} holds a NUL character, which cannot be stored",
                                   param=header)

    def _path_error(self, path: str) -> InvalidInput:
        """Name the path parameter at fault (routing has not run yet: match the route templates)."""
        for template in self.templates():
            pattern, _, _ = compile_path(template)
            match = pattern.match(path)
            if match is None:
                continue
            for name, value in match.groupdict().items():
                if unstorable(value):
                    return InvalidInput(f"{name}: the value holds a NUL character, which cannot be stored",
                                        param=name)
        return InvalidInput("the URL path holds a NUL character, which cannot be stored", param="path")

    # --- answers -----------------------------------------------------------------------------------

    @staticmethod
    def invalid(exc: InvalidInput, openai: bool) -> JSONResponse:
        if isinstance(exc, NotJson):
            if openai:
                return openai_error_response(400, "We could not parse the JSON body of your request. "
                                             f"({exc.message})", "invalid_request_error", None, None)
            return error_response(400, f"the request body is not valid JSON: {exc.message}", None)
        return refused_response(exc, openai=openai, default_code="invalid_value")

    @staticmethod
    def too_large(limit: RouteLimit, openai: bool) -> JSONResponse:
        # the body was not read: the connection cannot carry another request
        headers = {"connection": "close"}
        if openai:
            return openai_error_response(413, limit.too_large_message(), "invalid_request_error", None,
                                         limit.openai_code, headers)
        return error_response(413, limit.too_large_message(), None, headers)


def _content_type(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1").split(";")[0].strip().lower())
    return ""


def _content_length(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return str(value.decode("latin-1").strip())
    return None


class _Disconnected(bytes):
    pass


_DISCONNECTED = _Disconnected()


async def _read_within(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _DISCONNECTED
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then what the server says (a disconnect)

    return replay


def _counting(receive: Receive, limit: RouteLimit) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit.max_bytes:
                raise BodyTooLarge(limit)
        return message

    return counted
