"""OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and the handlers that use it
(the routes under `/v1/messages` answer in Anthropic's shape, `anthropic_errors.py`)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierbatch.simulator.anthropic_errors import AnthropicError, anthropic_error_response, is_anthropic_path


class OpenAIError(Exception):
    """Raise from a route to answer with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: OpenAIError) -> Response:
    return Response(
        content=json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)),
        status_code=exc.status, headers=exc.headers, media_type="application/json",
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def not_found(kind: str, object_id: str, param: str = "id") -> OpenAIError:
    return OpenAIError(404, f"No such {kind} object: {object_id}", "invalid_request_error", param, None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        detail = first.get("msg", "invalid")
        message = f"Invalid value for '{param}': {detail}" if param else "Invalid request"
        return error_response(OpenAIError(400, message, "invalid_request_error", param, None))

    async def on_anthropic_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AnthropicError)
        return anthropic_error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if is_anthropic_path(request.url.path):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            text = "Not Found" if exc.status_code == 404 else f"Method {request.method} not allowed"
            return anthropic_error_response(AnthropicError(kind, text, exc.status_code, exc.headers))
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        headers = dict(exc.headers or {})
        return error_response(OpenAIError(exc.status_code, message, "invalid_request_error", None, None,
                                          headers))

    async def on_unexpected(request: Request, _exc: Exception) -> Response:
        if is_anthropic_path(request.url.path):
            return anthropic_error_response(AnthropicError("api_error", "Internal server error"))
        return error_response(OpenAIError(
            500, "The server had an error while processing your request. Sorry about that!", "server_error"))

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(AnthropicError, on_anthropic_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def parse_json_body(raw: bytes) -> object:
    """The decoded JSON body, or OpenAI's 400 for a body that is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise OpenAIError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)",
            "invalid_request_error",
        ) from None
