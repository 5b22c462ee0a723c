"""FastAPI dependencies, all in one place."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from tierbatch.api.context import ApiContext
from tierbatch.base.errors import Unauthenticated
from tierbatch.db.models import Tenant
from tierbatch.tenants.store import KeyGrant

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ApiContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    """A session whose transaction commits when the route returns without error."""
    with ctx.sessions.begin() as session:
        yield session


# scope="function": the transaction commits before the response is sent, so a 2xx means it is stored
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def client_address(request: Request) -> str:
    """The peer address failed authentications are counted against (uvicorn applies `X-Forwarded-For` only
    from the proxies it trusts: loopback by default)."""
    return request.client.host if request.client is not None else "unknown"


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    return token.strip()


async def key_grant(request: Request, ctx: ContextDep) -> KeyGrant:
    """The valid, unrevoked key's grant, counted against the tenant's requests per minute."""
    token = bearer_token(request)
    try:
        grant = await ctx.keys.grant(token, client_address(request))
    except Unauthenticated:
        raise HTTPException(401, "invalid API key", headers=_CHALLENGE) from None
    await ctx.rate_limits.admit_request(grant)
    return grant


GrantDep = Annotated[KeyGrant, Depends(key_grant)]


async def get_tenant(grant: GrantDep, ctx: ContextDep) -> Tenant:
    def load() -> Tenant | None:
        with ctx.sessions() as session:
            return session.get(Tenant, grant.tenant_id)

    tenant = await anyio.to_thread.run_sync(load)
    if tenant is None:  # cannot happen while keys reference their tenant; never a 500 either way
        raise HTTPException(401, "invalid API key", headers=_CHALLENGE)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def require_admin(request: Request, ctx: ContextDep) -> None:
    token = bearer_token(request)
    try:
        await ctx.keys.check_admin(token, ctx.settings.admin_token, client_address(request))
    except Unauthenticated:
        raise HTTPException(401, "admin token required") from None


AdminDep = Annotated[None, Depends(require_admin)]
