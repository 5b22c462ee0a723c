"""Cost queries, the token report and budget status.

A tenant key sees that tenant's rows only; the admin token (TIERBATCH_ADMIN_TOKEN) sees every tenant
and may group by `tenant` or filter by `tenant_id`. Query parameters are parsed by tierbatch.costs.query into a
whitelisted query; unknown or invalid ones are a 400 naming the parameter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from tierbatch.api.deps import ContextDep, SessionDep, bearer_token, key_grant
from tierbatch.api.serialize import money
from tierbatch.base.errors import InvalidInput, NotFound
from tierbatch.costs.budgets import budget_status
from tierbatch.costs.query import parse_cost_query, result_body, run_cost_query
from tierbatch.costs.report import parse_report_params, token_report
from tierbatch.db.models import Tenant
from tierbatch.tenants.auth import secret_matches

router = APIRouter(prefix="/v1/costs", tags=["costs"])


@dataclass(frozen=True, slots=True)
class Caller:
    tenant_id: uuid.UUID | None  # None: the admin, who sees every tenant

    @property
    def admin(self) -> bool:
        return self.tenant_id is None


async def get_caller(request: Request, ctx: ContextDep) -> Caller:
    token = bearer_token(request)
    expected = ctx.settings.admin_token
    if expected and secret_matches(token, expected):
        return Caller(None)
    return Caller((await key_grant(request, ctx)).tenant_id)


CallerDep = Annotated[Caller, Depends(get_caller)]


def _params(request: Request) -> dict[str, list[str]]:
    return {key: request.query_params.getlist(key) for key in request.query_params}


@router.get("")
def costs(request: Request, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    query = parse_cost_query(_params(request), tenant_scope=caller.tenant_id)
    return result_body(run_cost_query(session, query))


@router.get("/report")
def report(request: Request, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    options = parse_report_params(_params(request), tenant_scope=caller.tenant_id)
    return token_report(session, options)


@router.get("/budget")
def budget(request: Request, caller: CallerDep, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    """This month's spend against the tenant's budget (the admin names the tenant with `tenant_id`)."""
    params = _params(request)
    unknown = [name for name in params if name != "tenant_id"]
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown query parameter", param=unknown[0])
    tenant_id = caller.tenant_id
    if caller.admin:
        given = params.get("tenant_id", [])
        if len(given) != 1:
            raise InvalidInput("tenant_id: required with the admin token", param="tenant_id")
        try:
            tenant_id = uuid.UUID(given[0])
        except ValueError:
            raise InvalidInput(f"tenant_id: {given[0]!r} is not an id", param="tenant_id") from None
    elif params:
        raise InvalidInput("tenant_id: only the admin token may choose a tenant", param="tenant_id")
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    limit = tenant.monthly_budget_usd
    status = budget_status(session, tenant.id, limit if limit is not None else Decimal(0))
    return {"object": "budget", "tenant_id": str(tenant.id), "policy": ctx.config.budget.policy,
            "monthly_budget_usd": money(limit), "month_start": status.month_start.isoformat(),
            "spent_usd": money(status.spent), "pending_tasks": status.pending_tasks,
            "pending_estimate_usd": money(status.pending_estimate),
            "remaining_usd": money(max(limit - status.committed, Decimal(0))) if limit is not None else None,
            "reached": status.reached if limit is not None else False}
