"""Admin API: tenants (DESIGN §8). Keys are shown once and stored hashed; the webhook secret (it signs the
tenant's job webhooks) is shown once at creation and at each rotation."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminDep, ContextDep, SessionDep
from api.serialize import money
from core.errors import NotFound
from core.models import Tenant
from core.tenants import create_tenant, rotate_webhook_secret

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0)


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


# --- budgets (issue 4) -------------------------------------------------------------------------------
class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monthly_budget_usd: Decimal | None = Field(ge=0)  # required; null removes the budget


@router.patch("/tenants/{tenant_id}")
def patch(tenant_id: str, body: TenantPatch, _: AdminDep, ctx: ContextDep) -> dict[str, Any]:
    try:
        key = uuid.UUID(tenant_id)
    except ValueError:
        raise NotFound(f"no tenant {tenant_id}") from None
    # committed before the answer is sent (SessionDep commits after it), so the next request sees it
    with ctx.sessions.begin() as session:
        tenant = session.get(Tenant, key, with_for_update=True)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id}")
        tenant.monthly_budget_usd = body.monthly_budget_usd
        return {"id": str(tenant.id), "object": "tenant", "name": tenant.name,
                "monthly_budget_usd": money(tenant.monthly_budget_usd)}
# --- end budgets -------------------------------------------------------------------------------------
