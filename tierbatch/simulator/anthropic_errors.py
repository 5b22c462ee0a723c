"""Anthropic's error body `{"type": "error", "error": {"type", "message"}, "request_id"}` for `/v1/messages*`.

Each error type has its status: invalid_request_error 400, authentication_error 401, permission_error 403,
not_found_error 404, request_too_large 413, rate_limit_error 429, api_error 500, timeout_error 504,
overloaded_error 529.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import MappingProxyType

from fastapi.responses import Response

ANTHROPIC_PREFIX = "/v1/messages"
STATUS_OF: Mapping[str, int] = MappingProxyType({
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
})


class AnthropicError(Exception):
    """Raise from an Anthropic route to answer with Anthropic's error body."""

    def __init__(self, type_: str, message: str, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.status = status if status is not None else STATUS_OF[type_]
        self.headers = dict(headers or {})


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


def anthropic_error_body(type_: str, message: str, request_id: str | None = None) -> dict[str, object]:
    return {"type": "error", "error": {"type": type_, "message": message},
            "request_id": request_id or new_request_id()}


def anthropic_error_response(exc: AnthropicError) -> Response:
    request_id = new_request_id()
    headers = {"request-id": request_id, **exc.headers}
    return Response(content=json.dumps(anthropic_error_body(exc.type, exc.message, request_id)),
                    status_code=exc.status, headers=headers, media_type="application/json")


def invalid_request(message: str) -> AnthropicError:
    return AnthropicError("invalid_request_error", message)


def is_anthropic_path(path: str) -> bool:
    """Whether a request path belongs to the Anthropic side (its errors take Anthropic's shape)."""
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def parse_anthropic_json(raw: bytes) -> object:
    """The decoded JSON body, or Anthropic's 400 for a body that is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("There was an error parsing the body of your request. Check that the body is "
                              "valid JSON.") from None
