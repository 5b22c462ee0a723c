"""`POST /v1/chat/completions` served ahead of the framework's middleware stack.

Every other request goes through the stack Starlette and FastAPI build (their error middlewares, the
framework's telemetry and body-limit layers, the router). The gateway's hot route needs only part of it,
and the rest cost about a tenth of the API's CPU per proxied call; `HotRoute` sends it down a chain of its
own, built from the same parts so it answers exactly as the full stack would:

    ServerErrorMiddleware (the app's 500 handler)
      GatewayTiming (tierbatch_gateway_request_seconds)
        InputGuard (the route's body limit and checks)
          ExceptionMiddleware (the app's exception handlers: domain errors, HTTP errors, outages)
            ChatCompletionsApp

`RequestIds` stays outside both, so every answer carries its id. The FastAPI route stays registered for
the OpenAPI description; it is not reached.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

from tierbatch.api.gateway_timing import GATEWAY_PATH, GatewayTiming
from tierbatch.api.limits import InputGuard, RouteLimit
from tierbatch.api.routes.openai_chat import ChatCompletionsApp


class HotRoute:
    """Dispatch `POST /v1/chat/completions` to `hot`, everything else to `full`."""

    def __init__(self, app: FastAPI, full: ASGIApp, hot: ASGIApp) -> None:
        self.app = app
        self.full = full
        self.hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == GATEWAY_PATH:
            scope["app"] = self.app  # what Starlette sets; routes read the app's state through it
            await self.hot(scope, receive, send)
        else:
            await self.full(scope, receive, send)


def hot_chain(app: FastAPI, limits: tuple[RouteLimit, ...]) -> ASGIApp:
    """The hot route's chain, with the app's exception handlers split as Starlette splits them (the 500
    or `Exception` handler answers what nothing else handles; the others map errors by type)."""
    error_handler: Any = None
    handlers: dict[Any, ExceptionHandler] = {}
    for key, value in app.exception_handlers.items():
        if key in (500, Exception):
            error_handler = value
        else:
            handlers[key] = value
    chain: ASGIApp = ExceptionMiddleware(ChatCompletionsApp(), handlers=handlers, debug=app.debug)
    chain = InputGuard(chain, limits)
    chain = GatewayTiming(chain)
    return ServerErrorMiddleware(chain, handler=error_handler, debug=app.debug)


def install_hot_route(app: FastAPI, limits: tuple[RouteLimit, ...]) -> None:
    """Put `HotRoute` in front of the app's middleware stack when Starlette builds it (after every
    handler and middleware is registered); call before `install_request_ids`, which must wrap it."""
    build = app.build_middleware_stack

    def build_with_hot_route() -> ASGIApp:
        return HotRoute(app, build(), hot_chain(app, limits))

    app.build_middleware_stack = build_with_hot_route  # type: ignore[method-assign]
