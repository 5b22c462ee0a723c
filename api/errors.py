"""The one place where errors become HTTP: a status code and a body in one of the API's two shapes.

- native routes answer `{"error": {"type", "message", "param"}}` (plus `code` on a 429);
- the OpenAI-compatible paths (`OPENAI_PATHS`) answer OpenAI's `{"error": {"message", "type", "param",
  "code"}}`;
- a URL under /v1 that no route has, or a method its route does not take, answers in OpenAI's shape on
  either surface (404 `unknown_url` "Invalid URL (METHOD /path)", 405 `method_not_allowed`).

The domain raises the classes of `tierbatch.base.errors` (its docstring draws the tree), which know
nothing of HTTP; `STATUS_OF` gives each its status, looked up along the class's MRO, so a subclass
answers like its parent unless it has a line of its own. Foreign errors that mean a dependency is down
are recognised by type (`outage_of`). No stack trace ever leaves.
"""

from __future__ import annotations

import logging
import math

import kombu.exceptions
import psycopg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierbatch.base.errors import (
    BudgetExceeded,
    ChainExhausted,
    Conflict,
    InvalidInput,
    InvalidValue,
    NotFound,
    ProviderError,
    RateLimited,
    Refused,
    RetryableProviderError,
    ServiceUnavailable,
    TierbatchError,
    TooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)
from tierbatch.base.logs import shown

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
          404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    error: dict[str, str | None] = {"type": _TYPES.get(status, "invalid_request_error"), "message": message,
                                    "param": param}
    if code is not None:  # e.g. `rate_limit_exceeded` on a 429, as the OpenAI surface says it
        error["code"] = code
    return JSONResponse({"error": error}, status_code=status, headers=headers)


# --- OpenAI-compatible surface: these paths answer errors in OpenAI's shape -----------------------
OPENAI_PATHS = ("/v1/chat/", "/v1/models", "/v1/files", "/v1/batches")
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                 413: "request_too_large", 500: "internal_error", 503: "service_unavailable"}


def is_openai_path(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


def openai_error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param,
                      "code": code if code is not None else _OPENAI_CODES.get(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


# Unknown URLs and methods under /v1/ answer as OpenAI does (its clients are pointed at /v1), whichever
# surface the path looks like: 404 `unknown_url` naming method and URL; a known URL with another method 405.
_ROUTING_MISSES = {404: "Not Found", 405: "Method Not Allowed"}


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def is_routing_miss(exc: StarletteHTTPException) -> bool:
    """The router's own 404/405 (no route, or not this method), not a route's answer."""
    return _ROUTING_MISSES.get(exc.status_code) == exc.detail


def unknown_url_response(method: str, path: str, status: int, headers: dict[str, str] | None) -> JSONResponse:
    url = f"{shown(method, 16)} {shown(path)}"  # bounded, no control characters: the client's own text
    if status == 405:
        allowed = (headers or {}).get("allow") or (headers or {}).get("Allow")
        message = f"Invalid method for URL ({url})" + (f": this URL takes {allowed}" if allowed else "")
        return openai_error_response(405, message, "invalid_request_error", None, "method_not_allowed", headers)
    return openai_error_response(404, f"Invalid URL ({url})", "invalid_request_error", None, "unknown_url", headers)
# --- end OpenAI-compatible surface -------------------------------------------------------------------


# Foreign errors that mean "a dependency is down", by type. A DBAPIError that is none of these is an
# outage only when SQLAlchemy says the connection died under it (connection_invalidated).
DATABASE_OUTAGES: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, psycopg.OperationalError)
BROKER_OUTAGES: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError)


def outage_of(exc: BaseException) -> ServiceUnavailable | None:
    """Our ServiceUnavailable for a foreign error that means a dependency is unreachable, else None."""
    if isinstance(exc, ServiceUnavailable):
        return exc
    if isinstance(exc, DATABASE_OUTAGES):
        return ServiceUnavailable("database")
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return ServiceUnavailable("database")
    if isinstance(exc, BROKER_OUTAGES):
        return ServiceUnavailable("broker")
    return None


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


# --- domain errors -> statuses ------------------------------------------------------------------------

STATUS_OF: dict[type[TierbatchError], int] = {
    InvalidInput: 400, InvalidValue: 422, TooLarge: 413, UnsupportedMediaType: 415,
    NotFound: 404, Conflict: 409, BudgetExceeded: 402,
    Unauthenticated: 401, RateLimited: 429, ServiceUnavailable: 503,
    ProviderError: 502,
}
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def status_of(exc: TierbatchError) -> int:
    """The status a domain error answers with: the entry of its class or of its nearest listed parent."""
    for kind in type(exc).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]  # type: ignore[index]
    return 500


def response_for(exc: TierbatchError, *, openai: bool) -> JSONResponse:
    """The answer for a domain error on one of the two surfaces (`openai`: the OpenAI-compatible paths)."""
    if isinstance(exc, Refused):
        return refused_response(exc, openai=openai)
    if isinstance(exc, Unauthenticated):
        headers = _CHALLENGE if exc.challenge else None
        if openai:
            return openai_error_response(401, exc.message, "invalid_request_error", None,
                                         exc.code or "invalid_api_key", headers)
        return error_response(401, exc.message, None, headers)
    if isinstance(exc, RateLimited):
        headers = {"retry-after": str(exc.retry_after)}
        if openai:  # OpenAI's type names what ran out: `requests` or `tokens`
            return openai_error_response(429, exc.message, exc.kind, None, "rate_limit_exceeded", headers)
        return error_response(429, exc.message, None, headers, "rate_limit_exceeded")
    if isinstance(exc, ServiceUnavailable):
        headers = {"retry-after": str(exc.retry_after_seconds)}
        if openai:
            return openai_error_response(503, exc.message, "server_error", None, exc.code, headers)
        return error_response(503, exc.message, None, headers)
    if isinstance(exc, ChainExhausted) and openai:
        return exhausted_response(exc)
    if isinstance(exc, ProviderError):
        if openai:
            return openai_error_response(502, exc.message, "upstream_error")
        return error_response(502, exc.message)
    log.error("a domain error with no answer of its own: %r", exc)
    return _internal_error(openai)


def refused_response(exc: Refused, *, openai: bool, default_code: str | None = None) -> JSONResponse:
    status = status_of(exc)
    if openai:
        kind = "insufficient_quota" if isinstance(exc, BudgetExceeded) else "invalid_request_error"
        return openai_error_response(status, exc.message, kind, exc.param, exc.code or default_code)
    return error_response(status, exc.message, exc.param)


def _internal_error(openai: bool) -> JSONResponse:
    # Starlette re-raises after this answer and the server then drops the connection: tell the client
    # not to send another request on it
    close = {"connection": "close"}
    if openai:
        return openai_error_response(500, "The server had an error while processing your request; the details "
                                     "are in the server log.", headers=close)
    return error_response(500, "internal error; the details are in the server log", headers=close)


# Provider statuses a client may see as they are; others (401/403/404 of *our* provider account or
# config) are our problem and leave as 502.
_CLIENT_STATUSES = frozenset({400, 413, 422})


def exhausted_response(exc: ChainExhausted) -> JSONResponse:
    """A chain that failed, in OpenAI's shape: the status a client can act on (a 429 keeps
    `retry-after`, every model cooling down is a 503 with one), naming the failed call's task."""
    status, message, kind, code, headers = _exhausted(exc)
    if exc.task_id is not None:
        headers["x-tierbatch-task-id"] = str(exc.task_id)
    return openai_error_response(status, message, kind, None, code, headers)


def _exhausted(exc: ChainExhausted) -> tuple[int, str, str, str | None, dict[str, str]]:
    errors = exc.errors
    if not errors:
        wait = max(1, math.ceil(exc.cooling_retry_after or 1))
        return (503, "Every model that can serve this request is cooling down after repeated failures; try again "
                f"in {wait}s.", "server_error", "model_cooling_down", {"retry-after": str(wait)})
    retryable = [e for e in errors if isinstance(e, RetryableProviderError)]
    if not retryable:
        last = errors[-1]
        client_status = last.status_code if last.status_code in _CLIENT_STATUSES else None
        if client_status is not None:
            return client_status, last.message, "invalid_request_error", None, {}
        return 502, last.message, "upstream_error", None, {}
    if all(e.status_code == 429 for e in retryable):
        hints = [e.retry_after for e in retryable if e.retry_after is not None]
        hint = min(hints) if hints else 1.0
        return (429, retryable[-1].message, "requests", "rate_limit_exceeded",
                {"retry-after": str(max(1, math.ceil(hint))), "retry-after-ms": str(int(hint * 1000))})
    last_retryable = retryable[-1]
    upstream_status = last_retryable.status_code
    if upstream_status is None:
        if last_retryable.timed_out:
            return 504, last_retryable.message, "server_error", "upstream_timeout", {}
        return 502, last_retryable.message, "server_error", "upstream_unreachable", {}
    # 408/409 after every retry: the upstream did not manage
    return upstream_status if upstream_status >= 500 else 502, last_retryable.message, "server_error", None, {}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TierbatchError)
    async def domain_error(request: Request, exc: TierbatchError) -> JSONResponse:
        if isinstance(exc, ServiceUnavailable):
            log.warning("%s %s: %s unreachable", request.method, request.url.path, exc.dependency)
        return response_for(exc, openai=is_openai_path(request))

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_from_loc(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            if is_openai_path(request):
                return openai_error_response(400, "We could not parse the JSON body of your request.")
            return error_response(400, "the request body is not valid JSON", None)
        message = first.get("msg", "invalid value")
        if is_openai_path(request):
            return openai_error_response(400, f"Invalid value for '{param}': {message}" if param else message, None,
                                         param, "invalid_value")
        return error_response(422, f"{param}: {message}" if param else message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        if is_routing_miss(exc) and is_api_path(request.url.path):
            return unknown_url_response(request.method, request.url.path, exc.status_code, headers)
        if is_openai_path(request):
            return openai_error_response(exc.status_code, str(exc.detail), None, None, None, headers)
        return error_response(exc.status_code, str(exc.detail), None, headers=headers)

    async def outage(request: Request, exc: Exception) -> JSONResponse:
        found = outage_of(exc)
        if found is None:
            return await unexpected(request, exc)
        log.warning("%s %s: %s unreachable (%s)", request.method, request.url.path, found.dependency,
                    type(exc).__name__)
        return response_for(found, openai=is_openai_path(request))

    foreign: tuple[type[Exception], ...] = (sqlalchemy.exc.DBAPIError, *DATABASE_OUTAGES, *BROKER_OUTAGES)
    for kind in foreign:
        app.add_exception_handler(kind, outage)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _internal_error(is_openai_path(request))
