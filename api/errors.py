"""Every error leaves the API as `{"error": {"type", "message", "param"}}`; no stack trace does."""

from __future__ import annotations

import logging

import kombu.exceptions
import psycopg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierbatch.base.errors import Conflict, InvalidInput, NotFound, RateLimited, ServiceUnavailable, TransitionError
from tierbatch.gateway.chat import GatewayError

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
# --- end OpenAI-compatible surface -------------------------------------------------------------------


# Foreign errors that mean "a dependency is down", by type. A DBAPIError that is none of these is an
# outage only when SQLAlchemy says the connection died under it (connection_invalidated).
DATABASE_OUTAGES: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, psycopg.OperationalError)
BROKER_OUTAGES: tuple[type[BaseException], ...] = (
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


def unavailable_response(request: Request, outage: ServiceUnavailable) -> JSONResponse:
    headers = {"retry-after": str(outage.retry_after_seconds)}
    if is_openai_path(request):
        return openai_error_response(503, str(outage), "server_error", None, "service_unavailable", headers)
    return error_response(503, str(outage), None, headers)


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return openai_error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers or None)

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        headers = {"retry-after": str(exc.retry_after)}
        if is_openai_path(request):  # OpenAI's type names what ran out: `requests` or `tokens`
            return openai_error_response(429, exc.message, exc.kind, None, "rate_limit_exceeded", headers)
        return error_response(429, exc.message, None, headers, "rate_limit_exceeded")

    @app.exception_handler(InvalidInput)
    async def invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
        if is_openai_path(request):
            return openai_error_response(exc.status_code, exc.message, None, exc.param)
        return error_response(exc.status_code, exc.message, exc.param)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        if is_openai_path(request):
            return openai_error_response(404, str(exc))
        return error_response(404, str(exc))

    @app.exception_handler(TransitionError)
    async def transition(request: Request, exc: TransitionError) -> JSONResponse:
        if is_openai_path(request):
            return openai_error_response(409, str(exc))
        return error_response(409, str(exc))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        if is_openai_path(request):
            return openai_error_response(409, str(exc))
        return error_response(409, str(exc))

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
        if is_openai_path(request):
            message = str(exc.detail)
            if exc.status_code == 404 and message == "Not Found":
                message = f"Invalid URL ({request.method} {request.url.path})"
            return openai_error_response(exc.status_code, message, None, None, None, headers)
        return error_response(exc.status_code, str(exc.detail), None, headers=headers)

    async def outage(request: Request, exc: Exception) -> JSONResponse:
        found = outage_of(exc)
        if found is None:
            return await unexpected(request, exc)
        log.warning("%s %s: %s unreachable (%s)", request.method, request.url.path, found.dependency,
                    type(exc).__name__)
        return unavailable_response(request, found)

    for kind in (ServiceUnavailable, sqlalchemy.exc.DBAPIError, *DATABASE_OUTAGES, *BROKER_OUTAGES):
        app.add_exception_handler(kind, outage)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and the server then drops the connection: tell the client
        # not to send another request on it
        close = {"connection": "close"}
        if is_openai_path(request):
            return openai_error_response(500, "The server had an error while processing your request; the details "
                                         "are in the server log.", headers=close)
        return error_response(500, "internal error; the details are in the server log", headers=close)
