"""The Bearer key check of every `/v1/*` route, active when `api_key` is configured."""

from __future__ import annotations

import hmac

from fastapi import Request

from tierbatch.simulator.errors import OpenAIError
from tierbatch.simulator.state import sim_state


def _mask(token: str) -> str:
    return token[:3] + "*" * max(len(token) - 7, 0) + token[-4:] if len(token) > 8 else "*" * len(token)


async def require_api_key(request: Request) -> None:
    key = sim_state(request).config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    if not header.strip():
        raise OpenAIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error", None, None,
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise OpenAIError(401, f"Incorrect API key provided: {_mask(token)}.", "invalid_request_error", None,
                          "invalid_api_key")
