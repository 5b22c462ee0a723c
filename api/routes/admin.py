"""Admin API: tenants. Keys are shown once and stored hashed; the webhook secret (it signs the
tenant's job webhooks) is shown once at creation and at each rotation. A tenant may hold several keys;
a revoked one is refused by every API process within a second."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import AdminDep, ContextDep, SessionDep
from tierbatch.api.serialize import money
from tierbatch.base.errors import NotFound
from tierbatch.db.models import ApiKey, Tenant
from tierbatch.tenants.auth import bump_generation
from tierbatch.tenants.store import create_api_key, create_tenant, list_api_keys, revoke_api_key, rotate_webhook_secret

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

# what the money column (Numeric(20, 10)) can hold: a larger figure is a 422 naming the field, not a 500
BudgetUsd = Annotated[Decimal, Field(ge=0, lt=Decimal("1e10"), decimal_places=10)]


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    monthly_budget_usd: BudgetUsd | None = None


@router.post("/tenants", status_code=201)
def create(body: TenantCreate, _: AdminDep, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    tenant = create_tenant(session, body.name, body.monthly_budget_usd, box=ctx.secret_box)
    return {"id": str(tenant.id), "object": "tenant", "name": tenant.name, "api_key": tenant.api_key,
            "webhook_secret": tenant.webhook_secret, "monthly_budget_usd": money(tenant.monthly_budget_usd)}


def _tenant_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no tenant {value}") from None


# --- job webhooks -----------------------------------------------------------------------------------
@router.post("/tenants/{tenant_id}/webhook-secret")
def rotate_secret(tenant_id: str, _: AdminDep, ctx: ContextDep) -> dict[str, Any]:
    """A new webhook secret, shown once; the old one stops signing at once (retries included)."""
    key = _tenant_id(tenant_id)
    with ctx.sessions.begin() as session:  # committed before the answer is sent
        rotated = rotate_webhook_secret(session, key, ctx.secret_box)
        tenant = rotated.tenant
        return {"id": str(tenant.id), "object": "tenant", "name": tenant.name,
                "webhook_secret": rotated.webhook_secret}
# --- end job webhooks -------------------------------------------------------------------------------


# --- budgets and rate limits ------------------------------------------------------------------------
PerMinute = Annotated[int, Field(ge=1, le=2_000_000_000)]


class TenantPatch(BaseModel):
    """Each field is optional: a PATCH changes only the fields it names; null removes that budget or limit."""

    model_config = ConfigDict(extra="forbid")

    monthly_budget_usd: BudgetUsd | None = None
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None


def tenant_body(tenant: Tenant) -> dict[str, Any]:
    return {"id": str(tenant.id), "object": "tenant", "name": tenant.name,
            "monthly_budget_usd": money(tenant.monthly_budget_usd),
            "requests_per_minute": tenant.requests_per_minute, "tokens_per_minute": tenant.tokens_per_minute}


async def _tell_processes(ctx: ApiContext) -> None:
    """After a committed change of keys or limits: every API process forgets what it remembered."""
    try:
        await bump_generation(ctx.redis, ctx.settings.redis_key_prefix)
    except RedisError as exc:  # the change stands; processes' key caches expire on their own (10 s)
        log.warning("key change committed but not announced: Redis %s", type(exc).__name__)


@router.patch("/tenants/{tenant_id}")
async def patch(tenant_id: str, body: TenantPatch, _: AdminDep, ctx: ContextDep) -> dict[str, Any]:
    key = _tenant_id(tenant_id)
    changes = {name: getattr(body, name) for name in body.model_fields_set}

    def apply() -> dict[str, Any]:
        # committed before the answer is sent, so the next request sees it
        with ctx.sessions.begin() as session:
            tenant = session.get(Tenant, key, with_for_update=True)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id}")
            for name, value in changes.items():
                setattr(tenant, name, value)
            session.flush()
            return tenant_body(tenant)

    answer = await run_in_threadpool(apply)
    if changes.keys() & {"requests_per_minute", "tokens_per_minute"}:
        await _tell_processes(ctx)
    return answer
# --- end budgets -------------------------------------------------------------------------------------


# --- API keys ----------------------------------------------------------------------------------------
def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def key_body(row: ApiKey) -> dict[str, Any]:
    """A key as listed: never its secret, nor its digest."""
    return {"id": str(row.id), "object": "api_key", "tenant_id": str(row.tenant_id), "prefix": row.prefix,
            "created_at": _when(row.created_at), "revoked_at": _when(row.revoked_at)}


@router.post("/tenants/{tenant_id}/keys", status_code=201)
def create_key(tenant_id: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """A new key for the tenant, shown once here; the tenant's other keys keep working."""
    new = create_api_key(session, _tenant_id(tenant_id))
    return {"id": str(new.id), "object": "api_key", "api_key": new.api_key, "prefix": new.api_key[:10],
            "created_at": _when(new.created_at)}


@router.get("/tenants/{tenant_id}/keys")
def list_keys(tenant_id: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    return {"object": "list", "data": [key_body(row) for row in list_api_keys(session, _tenant_id(tenant_id))]}


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, _: AdminDep, ctx: ContextDep) -> dict[str, Any]:
    """Revoke a key (idempotent): refused from then on, by every API process within a second."""
    tenant = _tenant_id(tenant_id)
    try:
        key = uuid.UUID(key_id)
    except ValueError:
        raise NotFound(f"no key {key_id} for tenant {tenant_id}") from None

    def revoke() -> dict[str, Any]:
        with ctx.sessions.begin() as session:  # committed before the processes are told
            return key_body(revoke_api_key(session, tenant, key))

    answer = await run_in_threadpool(revoke)
    await _tell_processes(ctx)
    return answer
# --- end API keys ------------------------------------------------------------------------------------
