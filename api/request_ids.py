"""A request id on every answer and every log line of a request, and one access line per request.

`RequestIds` is a pure ASGI middleware, the outermost layer of the app (outside Starlette's
ServerErrorMiddleware, so a 500 carries the id too):

- the id is the client's `x-request-id` when it is sane (`sane_request_id`: 1 to 128 characters of
  `[A-Za-z0-9._:@/+=-]`), else a new uuid4 hex: a hostile header is never echoed nor logged;
- it is in `tierbatch.base.logs.request_id_var` while the request runs (streams included), so every
  record logged meanwhile carries it;
- it goes out as `x-request-id` on the response start of every answer: routes, error handlers, the input
  guard, streams;
- at the end it logs one line to `tierbatch.access` at INFO: method, path (no query string, bounded and
  printable), status, duration_ms, and the task the answer names (`x-tierbatch-task-id`), if any.

The access lines are handed to logging in groups (`AccessLines`), a tenth of a second after the first
of a group: made and written where each request ended, a line cost the event loop about as much as
the rest of the middleware stack, and the next request on the connection waited for it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierbatch.base.logs import request_id_var, shown

HEADER = b"x-request-id"
TASK_HEADER = b"x-tierbatch-task-id"
MAX_ID_CHARS = 128
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=\-]{1,%d}" % MAX_ID_CHARS)

access_log = logging.getLogger("tierbatch.access")


def sane_request_id(value: bytes | None) -> str | None:
    """The client's id as text when it is safe to echo and log, else None."""
    if value is None or _SANE_ID.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def new_request_id() -> str:
    return uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


# what a finished request leaves for its access line: method, path, status, seconds taken, request id, the
# task the answer names, and the wall-clock time it ended
_Finished = tuple[str, str, int | None, float, str, str | None, float]


class AccessLines:
    """The access lines of finished requests, made and handled `delay_seconds` after the first of a group
    (0: at once), each with the time its request ended; a group also goes at `max_kept` lines, and on
    `flush` (the app's shutdown). A process killed outright loses the last `delay_seconds` of lines."""

    def __init__(self, logger: logging.Logger = access_log, *, delay_seconds: float = 0.1,
                 max_kept: int = 1000) -> None:
        self.logger = logger
        self.delay_seconds = delay_seconds
        self.max_kept = max_kept
        self._kept: list[_Finished] = []
        # the loop whose timer will hand over the kept lines: a loop that ended with its timer pending
        # (a test client's) must not leave the next loop's lines waiting for `max_kept`
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def add(self, scope: Scope, request_id: str, status: int | None, started: float, task_id: str | None) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        finished = (scope["method"], scope["path"], status, time.perf_counter() - started, request_id, task_id,
                    time.time())
        if self.delay_seconds <= 0:
            self._handle(finished)
            return
        self._kept.append(finished)
        if len(self._kept) >= self.max_kept:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to come back to
            self.flush()
            return
        if self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(self.delay_seconds, self._flush_on_timer)

    def _flush_on_timer(self) -> None:
        self._timer_loop = None
        self.flush()

    def flush(self) -> None:
        kept, self._kept = self._kept, []
        for finished in kept:
            self._handle(finished)

    def _handle(self, finished: _Finished) -> None:
        raw_method, raw_path, status, seconds, request_id, task_id, ended = finished
        duration_ms = round(seconds * 1000, 2)
        method = shown(raw_method, 16)
        path = shown(raw_path)
        # the id is given, not read from the context: the record is made after its request
        extra: dict[str, object] = {"method": method, "path": path, "status": status, "duration_ms": duration_ms,
                                    "request_id": request_id}
        if task_id is not None:
            extra["task_id"] = shown(task_id, 64)
        message = f"{method} {path} {status if status is not None else '-'} {duration_ms:.1f}ms"
        # the record made and handled directly (what `info` does, less its search of the caller's frame: the
        # access line's origin is always this line), dated when its request ended
        record = self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, message, (), None, extra=extra)
        record.created = ended
        record.msecs = (ended - int(ended)) * 1000
        self.logger.handle(record)


class RequestIds:
    def __init__(self, app: ASGIApp, access: AccessLines) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = sane_request_id(_header(scope, HEADER)) or new_request_id()
        encoded = request_id.encode("ascii")
        started = time.perf_counter()
        status: int | None = None
        task_id: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, task_id
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                for key, value in headers:
                    if key == TASK_HEADER:
                        task_id = value.decode("latin-1")
                headers.append((HEADER, encoded))
                message = {**message, "headers": headers}
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if status is None:
                status = 500  # what ServerErrorMiddleware answered, or nothing reached the client
            raise
        finally:
            self.access.add(scope, request_id, status, started, task_id)
            request_id_var.reset(token)


def install_request_ids(app: FastAPI, access: AccessLines | None = None) -> AccessLines:
    """Make `RequestIds` the outermost layer: Starlette builds its stack with ServerErrorMiddleware
    outside every added middleware, and a 500 must carry the id and be logged with it too. Returns the
    access lines, for the app's shutdown to flush."""
    lines = access if access is not None else AccessLines()
    build = app.build_middleware_stack

    def build_with_ids() -> ASGIApp:
        return RequestIds(build(), lines)

    app.build_middleware_stack = build_with_ids  # type: ignore[method-assign]
    return lines
