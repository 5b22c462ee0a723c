"""Admin API: tenants (DESIGN §8). Keys are shown once and stored hashed."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminDep, SessionDep
from api.serialize import money
from core.tenants import create_tenant

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0)


@router.post("/tenants", status_code=201)
def create(body: TenantCreate, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    tenant = create_tenant(session, body.name, body.monthly_budget_usd)
    return {"id": str(tenant.id), "object": "tenant", "name": tenant.name, "api_key": tenant.api_key,
            "monthly_budget_usd": money(tenant.monthly_budget_usd)}
