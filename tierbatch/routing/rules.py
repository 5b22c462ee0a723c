"""Routing rules per tenant and task type, and their change events.

A rule overrides config `[routing]` for one tenant's task type. Rules are seeded from config lazily (the
first time a tenant's routes are listed); until then config routing gives the same answer. Every change
is a `routing_events` row saying who or what moved it, when, why, and with which figures.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.db.models import RoutingEvent, RoutingRule
from tierbatch.routing.tiers import TierDecision


@dataclass(frozen=True, slots=True)
class RuleView:
    tier: Tier
    pinned: bool
    source: str


def tenant_rules(session: Session, tenant_id: uuid.UUID) -> dict[str, RuleView]:
    """All of a tenant's rules by task type, in one query (used once per submission)."""
    rows = session.execute(select(RoutingRule.task_type, RoutingRule.tier, RoutingRule.pinned, RoutingRule.source)
                           .where(RoutingRule.tenant_id == tenant_id))
    return {r.task_type: RuleView(r.tier, r.pinned, r.source) for r in rows}


def rule_decision(rules: Mapping[str, RuleView], requested: RequestedTier, task_type: str) -> TierDecision | None:
    """The tier a tenant's rule gives an `auto` request of `task_type`, or None (then resolve_tier decides).
    For every path that creates tasks: load `tenant_rules` once per request, then call this per task."""
    rule = rules.get(task_type) if requested is RequestedTier.AUTO else None
    return TierDecision(rule.tier, f"routing rule for {task_type!r} ({rule.source})") if rule else None


def config_tier(config: AppConfig, task_type: str) -> Tier | None:
    configured = config.routing.get(task_type)
    if configured is None or configured is RequestedTier.AUTO:
        return None
    return Tier(configured.value)


def seed_rules(session: Session, tenant_id: uuid.UUID, config: AppConfig) -> None:
    """Copy config `[routing]` into the tenant's rules where it has none yet (idempotent)."""
    rows = [{"tenant_id": tenant_id, "task_type": task_type, "tier": tier, "pinned": False, "source": "config"}
            for task_type in config.routing if (tier := config_tier(config, task_type)) is not None]
    if rows:
        session.execute(insert(RoutingRule).values(rows)
                        .on_conflict_do_nothing(index_elements=["tenant_id", "task_type"]))


def lock_task_type(session: Session, tenant_id: uuid.UUID, task_type: str) -> None:
    """Serialise rule changes for one tenant's task type until the transaction ends."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"{tenant_id}:{task_type}", 6))))


def set_rule(session: Session, tenant_id: uuid.UUID, task_type: str, tier: Tier, pinned: bool, *,
             actor: str, action: str, reason: str, figures: Mapping[str, Any] | None = None,
             source: str) -> RoutingRule:
    """Create or change a rule and record the event (the caller commits)."""
    lock_task_type(session, tenant_id, task_type)
    rule = session.scalar(select(RoutingRule).where(RoutingRule.tenant_id == tenant_id,
                                                    RoutingRule.task_type == task_type).with_for_update())
    before = rule.tier if rule is not None else None
    if rule is None:
        rule = RoutingRule(tenant_id=tenant_id, task_type=task_type, tier=tier, pinned=pinned, source=source)
        session.add(rule)
    else:
        rule.tier, rule.pinned, rule.source = tier, pinned, source
        rule.updated_at = func.now()  # type: ignore[assignment]
    session.add(RoutingEvent(tenant_id=tenant_id, task_type=task_type, actor=actor, action=action,
                             from_tier=before, to_tier=tier, pinned=pinned, reason=reason,
                             figures=dict(figures or {})))
    session.flush()
    return rule


def list_rules(session: Session, tenant_id: uuid.UUID) -> list[RoutingRule]:
    return list(session.scalars(select(RoutingRule).where(RoutingRule.tenant_id == tenant_id)
                                .order_by(RoutingRule.task_type)))


def list_events(session: Session, tenant_id: uuid.UUID, task_type: str | None = None,
                limit: int = 1000) -> list[RoutingEvent]:
    query = select(RoutingEvent).where(RoutingEvent.tenant_id == tenant_id)
    if task_type is not None:
        query = query.where(RoutingEvent.task_type == task_type)
    return list(session.scalars(query.order_by(RoutingEvent.created_at, RoutingEvent.id).limit(limit)))
