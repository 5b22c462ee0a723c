"""FastAPI dependencies, all in one place."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from api.context import ApiContext
from core.models import Tenant
from core.tenants import tenant_for_key


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


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def get_tenant(request: Request, ctx: ContextDep) -> Tenant:
    token = bearer_token(request)
    with ctx.sessions() as session:
        tenant = tenant_for_key(session, token)
    if tenant is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def require_admin(request: Request, ctx: ContextDep) -> None:
    token = bearer_token(request)
    expected = ctx.settings.admin_token
    if not expected or not hmac.compare_digest(token, expected):
        raise HTTPException(401, "admin token required")


AdminDep = Annotated[None, Depends(require_admin)]
