"""Schedules and their recent runs for the dashboard: one tenant's, or every tenant's (scope None)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.db.models import Schedule, ScheduleRun


def list_schedules_in(session: Session, scope: uuid.UUID | None, *, limit: int) -> list[Schedule]:
    query = select(Schedule)
    if scope is not None:
        query = query.where(Schedule.tenant_id == scope)
    return list(session.scalars(query.order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit)))


def recent_runs(session: Session, schedule_ids: Sequence[uuid.UUID], *, per_schedule: int
                ) -> dict[uuid.UUID, list[ScheduleRun]]:
    """The newest `per_schedule` runs of each schedule, newest first (one query)."""
    out: dict[uuid.UUID, list[ScheduleRun]] = {s: [] for s in schedule_ids}
    if not schedule_ids:
        return out
    rank = func.row_number().over(partition_by=ScheduleRun.schedule_id,
                                  order_by=(ScheduleRun.created_at.desc(), ScheduleRun.id.desc())).label("rank")
    ranked = select(ScheduleRun.id, rank).where(ScheduleRun.schedule_id.in_(schedule_ids)).subquery()
    runs = session.scalars(select(ScheduleRun).join(ranked, ranked.c.id == ScheduleRun.id)
                           .where(ranked.c.rank <= per_schedule)
                           .order_by(ScheduleRun.created_at.desc(), ScheduleRun.id.desc()))
    for run in runs:
        out[run.schedule_id].append(run)
    return out
