"""The header checks of every `/v1/messages*` route: the key (the same rule as the OpenAI side's Bearer key:
checked only when `api_key` is configured) and a required `anthropic-version`.

The key is read from `x-api-key`, else from `Authorization: Bearer ...`: recent `anthropic` SDKs send an
`api_key` as a Bearer token, which the Messages API accepts too."""

from __future__ import annotations

import hmac

from fastapi import Request

from tierbatch.simulator.anthropic_errors import AnthropicError, invalid_request
from tierbatch.simulator.state import sim_state


async def require_anthropic_headers(request: Request) -> None:
    key = sim_state(request).config.api_key
    if key:
        given = request.headers.get("x-api-key", "").strip()
        if not given:
            scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not given:
            raise AnthropicError("authentication_error", "x-api-key header is required")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise AnthropicError("authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version", "").strip():
        raise invalid_request("anthropic-version: header is required")
