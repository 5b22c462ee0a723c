"""Who is looking at the dashboard: a signed-in session (cookie) or an `Authorization: Bearer` header.

The cookie carries a random session token only (tierbatch/tenants/sessions.py keeps the record in Redis,
8 hours). A tenant's session is checked against its key on every page, so revoking the key ends it; an
admin session ends when the admin token changes. POST forms carry the session's CSRF token and the cookie
is SameSite=Strict; a bearer header is never sent by a browser on its own, so it needs neither.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import anyio
from starlette.requests import Request

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import bearer_token, client_address
from tierbatch.api.limits import DASHBOARD_FORM_BYTES
from tierbatch.base.errors import InvalidInput, TooLarge, Unauthenticated
from tierbatch.base.inputs import unstorable
from tierbatch.db.models import Tenant
from tierbatch.tenants.auth import secret_matches
from tierbatch.tenants.sessions import DashboardSessions, SignIn, key_is_live

COOKIE = "tb_dashboard"
FORM_BYTES = DASHBOARD_FORM_BYTES  # a sign-in or a route change: a few short fields


@dataclass(frozen=True, slots=True)
class Viewer:
    tenant_id: uuid.UUID | None  # None: the admin, who sees every tenant
    tenant_name: str | None
    csrf: str | None  # the session's form token; None when signed in by a bearer header
    session_token: str | None

    @property
    def admin(self) -> bool:
        return self.tenant_id is None

    def check_csrf(self, presented: str | None) -> None:
        """A cookie session's forms must carry its token (a bearer header is never ambient)."""
        if self.csrf is None:
            return
        if not presented or not secrets.compare_digest(presented.encode(), self.csrf.encode()):
            raise InvalidInput("csrf: the form is stale or was not sent from this dashboard; reload the page",
                               param="csrf")


def sessions_of(ctx: ApiContext) -> DashboardSessions:
    return DashboardSessions(ctx.redis, ctx.settings.redis_key_prefix)


def is_admin_token(ctx: ApiContext, secret: str) -> bool:
    expected = ctx.settings.admin_token
    return bool(expected) and secret_matches(secret, expected)


async def _tenant_name(ctx: ApiContext, tenant_id: uuid.UUID) -> str | None:
    def load() -> str | None:
        with ctx.sessions() as session:
            tenant = session.get(Tenant, tenant_id)
            return tenant.name if tenant is not None else None

    return await anyio.to_thread.run_sync(load)


async def _session_viewer(ctx: ApiContext, token: str) -> Viewer | None:
    sign_in: SignIn | None = await sessions_of(ctx).find(token)
    if sign_in is None:
        return None
    if sign_in.admin:
        return Viewer(None, None, sign_in.csrf, token) if sign_in.admin_token_matches(ctx.settings.admin_token) \
            else None
    tenant_id, key_id = sign_in.tenant_id, sign_in.key_id
    if tenant_id is None or key_id is None:
        return None

    def live() -> str | None:
        with ctx.sessions() as session:
            if not key_is_live(session, tenant_id, key_id):
                return None
            tenant = session.get(Tenant, tenant_id)
            return tenant.name if tenant is not None else None

    name = await anyio.to_thread.run_sync(live)
    return Viewer(tenant_id, name, sign_in.csrf, token) if name is not None else None


async def current_viewer(request: Request, ctx: ApiContext) -> Viewer | None:
    """The viewer of a request, or None: not signed in (the page sends the browser to sign in). A bearer
    header that is not a valid key or admin token is Unauthenticated (401), counted like on the API."""
    if request.headers.get("authorization"):
        token = bearer_token(request)
        if is_admin_token(ctx, token):
            return Viewer(None, None, None, None)
        grant = await ctx.keys.grant(token, client_address(request))
        await ctx.rate_limits.admit_request(grant)
        return Viewer(grant.tenant_id, await _tenant_name(ctx, grant.tenant_id), None, None)
    cookie = request.cookies.get(COOKIE)
    return await _session_viewer(ctx, cookie) if cookie else None


async def sign_in(request: Request, ctx: ApiContext, secret: str) -> tuple[str, SignIn]:
    """A new session for a tenant key or the admin token (failures counted per address by ctx.keys)."""
    address = client_address(request)
    store = sessions_of(ctx)
    if not secret:
        raise Unauthenticated("enter an API key or the admin token", "missing_api_key")
    if is_admin_token(ctx, secret):
        await ctx.keys.check_admin(secret, ctx.settings.admin_token, address)
        return await store.open_for_admin(secret)
    grant = await ctx.keys.grant(secret, address)
    return await store.open_for_tenant(grant.tenant_id, grant.key_id)


def check_same_origin(request: Request) -> None:
    """A browser names the page a POST comes from; one from another site is refused (beside SameSite)."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or an old one: SameSite=Strict and the CSRF token still hold
        return
    ours = urlsplit(str(request.base_url))
    theirs = urlsplit(origin)
    if (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
        raise InvalidInput("Origin: the form was posted from another site", param="Origin")


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the dashboard's forms): one value per field, no NUL characters."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            raise TooLarge(f"the form is over {FORM_BYTES} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and content_type != "application/x-www-form-urlencoded":
        raise InvalidInput("send the form as application/x-www-form-urlencoded", param="Content-Type")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidInput("the form is not UTF-8") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if unstorable(name) or unstorable(value):
            raise InvalidInput(f"{name}: holds a character that cannot be stored", param=name)
        form[name] = value
    return form
