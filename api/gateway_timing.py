"""The gateway's latency histogram (`tierbatch_gateway_request_seconds`): a pure ASGI middleware that times
`POST /v1/chat/completions` from its first byte in to its last byte out (a stream's end included).

Other requests pass straight through; a timed one costs two clock reads and one histogram observation,
no lock beyond prometheus_client's, no I/O."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierbatch.metrics.catalog import GATEWAY_REQUEST_SECONDS, status_class

GATEWAY_PATH = "/v1/chat/completions"


class GatewayTiming:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != GATEWAY_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": None, "observed": False}

        def observe() -> None:
            if not status["observed"]:
                status["observed"] = True
                GATEWAY_REQUEST_SECONDS.labels(status_class(status["code"])).observe(time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            observe()  # a response cut short (the client left, an error) is timed too
