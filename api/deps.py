"""FastAPI dependencies, all in one place."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from tierbatch.api.context import ApiContext
from tierbatch.base.errors import Unauthenticated
from tierbatch.db.models import Tenant
from tierbatch.tenants.auth import secret_matches
from tierbatch.tenants.store import KeyGrant


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
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
    return token.strip()


async def key_grant(request: Request, ctx: ContextDep) -> KeyGrant:
    """The valid, unrevoked key's grant, counted against the tenant's requests per minute (else
    Unauthenticated, or RateLimited once the address has failed too often)."""
    grant = await ctx.keys.grant(bearer_token(request), client_address(request))
    await ctx.rate_limits.admit_request(grant)
    return grant


GrantDep = Annotated[KeyGrant, Depends(key_grant)]


async def get_tenant(grant: GrantDep, ctx: ContextDep) -> Tenant:
    def load() -> Tenant | None:
        with ctx.sessions() as session:
            return session.get(Tenant, grant.tenant_id)

    tenant = await anyio.to_thread.run_sync(load)
    if tenant is None:  # cannot happen while keys reference their tenant; never a 500 either way
        raise Unauthenticated()
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def require_admin(request: Request, ctx: ContextDep) -> None:
    await ctx.keys.check_admin(bearer_token(request), ctx.settings.admin_token, client_address(request))


AdminDep = Annotated[None, Depends(require_admin)]


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who reads a resource both tenants and the operator may see: a tenant (`tenant_id`), or the operator
    holding the admin token (`tenant_id` None: everything)."""

    tenant_id: uuid.UUID | None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


async def get_viewer(request: Request, ctx: ContextDep) -> Viewer:
    """The admin token makes the operator; any other bearer must be a tenant's valid key (counted against
    its requests per minute, and a failure against the address, as on every tenant route)."""
    token = bearer_token(request)
    expected = ctx.settings.admin_token
    if expected and secret_matches(token, expected):
        return Viewer(None)
    grant = await key_grant(request, ctx)
    return Viewer(grant.tenant_id)


ViewerDep = Annotated[Viewer, Depends(get_viewer)]
