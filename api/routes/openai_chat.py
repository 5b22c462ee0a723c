"""`POST /v1/chat/completions`: the OpenAI-compatible front door, immediate from this process.

`smart-select` routes as a task is routed (explicit tier, tenant rule, config, heuristic); a configured
model is served as asked, with its fallbacks. The answer is the provider's body, relayed unchanged (its
`model` is the model that served it), with `x-tierbatch-task-id`, `x-tierbatch-tier`,
`x-tierbatch-cost-usd` and `x-tierbatch-cache` (`hit` when answered from the response cache) headers; a
stream (never cached) relays the provider's chunks as they arrive (no cost header: the cost is known at
the end, on the task).

Fail closed: the request's fields and characters are checked before any provider call
(`tierbatch.gateway.fields`); an answer leaves only once its task and ledger row are committed (a stream's
usage chunk and `[DONE]` wait for the commit), else the client gets a 503 `recording_failed` (an error
event, for a stream) instead.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import client_address
from tierbatch.api.limits import parsed_json
from tierbatch.base.errors import InvalidInput, Unauthenticated
from tierbatch.gateway.call import format_cost
from tierbatch.gateway.routing import prepare_chat_call
from tierbatch.tenants.auth import MAX_KEY_CHARS, estimated_tokens
from tierbatch.tenants.store import KeyGrant

router = APIRouter(tags=["openai"])



def context_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def authenticate_grant(request: Request) -> KeyGrant:
    """The grant of the Bearer key (remembered per process, revocations seen within a second), counted
    against the tenant's requests per minute; else OpenAI's 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("You didn't provide an API key. You need to provide your API key in an Authorization "
                              "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "missing_api_key")
    ctx = context_of(request)
    try:
        grant = await ctx.keys.grant(token, client_address(request))
    except Unauthenticated:
        shown = token[:6] + "…" + token[-4:] if 12 < len(token) <= MAX_KEY_CHARS else "…"
        raise Unauthenticated(f"Incorrect API key provided: {shown}.", "invalid_api_key") from None
    await ctx.rate_limits.admit_request(grant)
    return grant


async def authenticate(request: Request) -> uuid.UUID:
    """The tenant of the Bearer key (see `authenticate_grant`)."""
    return (await authenticate_grant(request)).tenant_id


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep to parse
        raise InvalidInput("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                           "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
                           "sent was not valid JSON.)") from None


class RelayResponse(StreamingResponse):
    """A streaming response whose iterator is always closed when the response ends, however it ends
    (normal end, client disconnect, cancellation): the stream's bookkeeping runs in its `finally`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    ctx = context_of(request)
    grant = await authenticate_grant(request)
    tenant_id = grant.tenant_id
    raw = await request.body()  # within the input guard's limit for this route (api/limits.py)
    # tokens per minute: the body's size is the admission estimate (before any provider call)
    await ctx.rate_limits.admit_tokens(grant, estimated_tokens(len(raw)))
    call = prepare_chat_call(ctx.config, parsed_json(request, raw, parse_json), request.headers,
                             await ctx.tenant_policies.policy(tenant_id))
    if call.stream:
        session = await ctx.gateway.open_stream(tenant_id, call)
        return RelayResponse(session.events(), media_type="text/event-stream", headers={
            "x-tierbatch-task-id": str(session.task_id), "x-tierbatch-tier": session.tier.value,
            "cache-control": "no-cache"})
    done = await ctx.gateway.complete(tenant_id, call)
    return Response(done.content, media_type="application/json", headers={
        "x-tierbatch-task-id": str(done.task_id), "x-tierbatch-tier": done.tier.value,
        "x-tierbatch-cost-usd": format_cost(done.cost_usd), "x-tierbatch-cache": "hit" if done.cache_hit else "miss"})


class ChatCompletionsApp:
    """The same route as a raw ASGI app, without FastAPI's per-request machinery (dependency resolution,
    its own exception wrapper), served ahead of the framework's stack (`tierbatch.api.hot_route`). Every
    check is the route's own; an error raised here is answered by the app's exception handlers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await chat_completions(Request(scope, receive, send))
        await response(scope, receive, send)
