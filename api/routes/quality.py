"""Routing rules and the quality report: `GET /v1/routes`, `PUT /v1/routes/{task_type}`,
`GET /v1/quality`. A tenant key sees and changes its own rules only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.api.deps import ContextDep, SessionDep, TenantDep
from tierbatch.base.config import AppConfig
from tierbatch.base.states import Mode, TaskStatus, Tier
from tierbatch.db.models import LedgerEntry, QualityComparison, RoutingEvent, RoutingRule, Task
from tierbatch.quality.monitor import window_stats
from tierbatch.routing.rules import config_tier, list_events, list_rules, seed_rules, set_rule

router = APIRouter(tags=["quality"])


class RouteChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: Tier
    pinned: bool = False
    reason: str | None = Field(default=None, max_length=500)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def rule_body(rule: RoutingRule) -> dict[str, Any]:
    return {"object": "route", "task_type": rule.task_type, "tier": rule.tier.value, "pinned": rule.pinned,
            "source": rule.source, "updated_at": _iso(rule.updated_at)}


def event_body(event: RoutingEvent) -> dict[str, Any]:
    return {"task_type": event.task_type, "action": event.action, "actor": event.actor,
            "from_tier": event.from_tier.value if event.from_tier else None, "to_tier": event.to_tier.value,
            "pinned": event.pinned, "reason": event.reason, "figures": event.figures,
            "at": _iso(event.created_at)}


@router.get("/v1/routes")
def read_routes(tenant: TenantDep, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    seed_rules(session, tenant.id, ctx.config)
    return {"object": "list", "data": [rule_body(r) for r in list_rules(session, tenant.id)]}


@router.put("/v1/routes/{task_type}")
def put_route(task_type: str, change: RouteChange, tenant: TenantDep, session: SessionDep,
              ctx: ContextDep) -> dict[str, Any]:
    rule = set_rule(session, tenant.id, task_type, change.tier, change.pinned, actor="api", action="set",
                    reason=change.reason or "set through PUT /v1/routes", source="api")
    session.refresh(rule)
    ctx.tenant_policies.forget(tenant.id)  # this process's smart-select sees the change at once
    return rule_body(rule)


def _latency(session: Session, tenant_id: Any) -> list[dict[str, Any]]:
    rows = session.execute(
        select(LedgerEntry.served_model, LedgerEntry.mode, func.count(),
               func.percentile_cont(0.5).within_group(LedgerEntry.latency_ms),
               func.percentile_cont(0.95).within_group(LedgerEntry.latency_ms))
        .where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.mode.in_([Mode.IMMEDIATE, Mode.SHADOW]),
               LedgerEntry.latency_ms.is_not(None))
        .group_by(LedgerEntry.served_model, LedgerEntry.mode).order_by(LedgerEntry.served_model))
    return [{"model": m, "mode": mode.value, "calls": n, "p50_ms": p50, "p95_ms": p95}
            for m, mode, n, p50, p95 in rows]


def _batch_turnaround(session: Session, tenant_id: Any) -> dict[str, Any]:
    seconds = func.extract("epoch", Task.finished_at - Task.created_at)
    n, p50, p95 = session.execute(
        select(func.count(), func.percentile_cont(0.5).within_group(seconds),
               func.percentile_cont(0.95).within_group(seconds))
        .where(Task.tenant_id == tenant_id, Task.mode == Mode.BATCH, Task.status == TaskStatus.SUCCEEDED)).one()
    return {"tasks": n, "p50_seconds": p50, "p95_seconds": p95}


def quality_report(session: Session, config: AppConfig, tenant_id: Any) -> dict[str, Any]:
    rules = {r.task_type: r for r in list_rules(session, tenant_id)}
    compared = set(session.scalars(select(QualityComparison.task_type).distinct()
                                   .where(QualityComparison.tenant_id == tenant_id)))
    events = list_events(session, tenant_id)
    names = sorted(set(rules) | compared | {e.task_type for e in events})
    shadow_spend = dict(session.execute(
        select(LedgerEntry.task_type, func.sum(LedgerEntry.cost_usd))
        .where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.mode == Mode.SHADOW)
        .group_by(LedgerEntry.task_type)).tuples().all())
    data = []
    for name in names:
        rule = rules.get(name)
        tier = rule.tier if rule else config_tier(config, name)
        stats = window_stats(session, tenant_id, name, config.quality.window, tier or Tier.LIGHT)
        data.append({
            "task_type": name, "tier": tier.value if tier else "auto", "pinned": bool(rule and rule.pinned),
            "source": rule.source if rule else ("config" if tier else "auto"),
            **stats.figures(config.quality),
            "shadow_cost_usd": str(shadow_spend[name]) if shadow_spend.get(name) is not None else None,
            "events": [event_body(e) for e in events if e.task_type == name],
        })
    return {"object": "quality", "settings": config.quality.model_dump(), "data": data,
            "latency": _latency(session, tenant_id), "batch_turnaround": _batch_turnaround(session, tenant_id)}


@router.get("/v1/quality")
def read_quality(tenant: TenantDep, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    return quality_report(session, ctx.config, tenant.id)
