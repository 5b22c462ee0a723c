"""The quality monitor's record for the dashboard: agreement per task type and day, routing events and
rules; one tenant's, or every tenant's (scope None)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Date, Integer, cast, func, select
from sqlalchemy.orm import Session

from tierbatch.db.models import QualityComparison, RoutingEvent, RoutingRule


@dataclass(frozen=True, slots=True)
class DailyAgreement:
    day: date
    task_type: str
    compared: int  # comparisons with an answer from both tiers
    agreed: int

    @property
    def rate(self) -> float:
        return self.agreed / self.compared if self.compared else 0.0


def agreement_by_day(session: Session, scope: uuid.UUID | None, *, since: datetime, until: datetime
                     ) -> list[DailyAgreement]:
    """Comparisons whose shadow call answered, per UTC day and task type, in [since, until)."""
    day = cast(func.timezone("UTC", QualityComparison.created_at), Date).label("day")
    query = (select(day, QualityComparison.task_type, func.count(),
                    func.sum(cast(QualityComparison.agreed, Integer)))
             .where(QualityComparison.agreed.is_not(None), QualityComparison.created_at >= since,
                    QualityComparison.created_at < until)
             .group_by(day, QualityComparison.task_type).order_by(day, QualityComparison.task_type))
    if scope is not None:
        query = query.where(QualityComparison.tenant_id == scope)
    return [DailyAgreement(d, t, int(n), int(a or 0)) for d, t, n, a in session.execute(query)]


def events_in(session: Session, scope: uuid.UUID | None, *, limit: int) -> list[RoutingEvent]:
    """Promotions, demotions and changes of routes, newest first."""
    query = select(RoutingEvent)
    if scope is not None:
        query = query.where(RoutingEvent.tenant_id == scope)
    return list(session.scalars(query.order_by(RoutingEvent.created_at.desc(), RoutingEvent.id.desc()).limit(limit)))


def rules_in(session: Session, scope: uuid.UUID | None) -> list[RoutingRule]:
    query = select(RoutingRule)
    if scope is not None:
        query = query.where(RoutingRule.tenant_id == scope)
    return list(session.scalars(query.order_by(RoutingRule.tenant_id, RoutingRule.task_type)))
