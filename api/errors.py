"""Every error leaves the API as `{"error": {"type", "message", "param"}}`; no stack trace does."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import Conflict, InvalidInput, NotFound, TransitionError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
          404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": _TYPES.get(status, "invalid_request_error"), "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidInput)
    async def invalid_input(_: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(TransitionError)
    async def transition(_: Request, exc: TransitionError) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_from_loc(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None)
        message = first.get("msg", "invalid value")
        return error_response(422, f"{param}: {message}" if param else message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None,
                              headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the details are in the server log")
