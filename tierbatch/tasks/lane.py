"""The background lane: non-urgent light work on a light provider without a Batch API (`batch = false`,
e.g. a self-hosted llama.cpp or vLLM server), called at most `max_concurrency` at a time.

Such work would otherwise wait for a Batch API submission. With no Batch API to hand it to, it is
called now, but in the background and bounded, so a 100,000-item job cannot flood the server and urgent
work is not held behind it:

- Routing (`tierbatch.tasks.store.route_queued_tasks`) leaves these tasks `queued` (dispatched, no call
  message sent). Postgres holds the lane's backlog: its members are the queued, dispatched, non-urgent
  Light tasks (`lane_members`); the reconciler does not re-send them (`stale_queued_task_ids`).
- The pump (`claim_lane_tasks`, run by the worker after routing, after each lane call and on a beat)
  claims work in one transaction under a Postgres advisory lock per provider: it counts the lane's
  tasks `running` under a live lease, and claims at most `bound - running` more (queued → running,
  one fresh lease; deadlines first, then oldest first). The lock serialises pumps of every worker
  process, so the count and the claim cannot interleave: at most `bound` lane calls are in flight
  across all workers. A claimed task's call message carries its lease token; a lost message or a dead
  worker leaves a lease that nobody renews, which the reconciler releases (running → queued), and the
  pump takes the task again.
- Lane calls run from their own Celery queue (`background`), so urgent calls on `immediate` never wait
  behind the backlog. Keep the bound below a worker's concurrency: urgent calls then always find a
  free slot.
- A 429 of the lane's provider pauses the whole lane for its `retry-after` (a Redis key with that TTL,
  `tierbatch.worker.lane`) and puts the task back, due after the same delay; other failures go along
  the tier's fallback chain like any immediate call.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.states import TaskStatus, Tier
from tierbatch.db.models import Task
from tierbatch.routing.tiers import lane_bound, lane_provider
from tierbatch.tasks import transitions
from tierbatch.tasks.store import ClaimedTask


def lane_members() -> ColumnElement[bool]:
    """Tasks of the lane (whatever their status): routed, non-urgent, light and not a shadow call."""
    return and_(Task.tier == Tier.LIGHT, Task.urgent.is_(False), Task.shadow_of.is_(None),
                Task.dispatched_at.is_not(None))


def _lock(session: Session, provider: str) -> None:
    """Serialise the lane's pumps for `provider` until the transaction ends."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"tierbatch-lane:{provider}", 0))))


def lane_in_flight(session: Session) -> int:
    """The lane's tasks running under a live lease."""
    return int(session.scalar(select(func.count()).select_from(Task).where(
        Task.status == TaskStatus.RUNNING, Task.lease_expires_at > func.now(), lane_members())) or 0)


def claim_lane_tasks(session: Session, config: AppConfig, lease_seconds: float) -> list[ClaimedTask]:
    """Claim as many of the lane's due tasks as the bound leaves room for (none when the lane is off)."""
    provider = lane_provider(config)
    if provider is None:
        return []
    _lock(session, provider)
    free = lane_bound(config) - lane_in_flight(session)
    if free <= 0:
        return []
    ids = list(session.scalars(
        select(Task.id).where(Task.status == TaskStatus.QUEUED, lane_members(),
                              or_(Task.not_before.is_(None), Task.not_before <= func.now()))
        .order_by(Task.deadline.asc().nulls_last(), Task.created_at, Task.id)
        .limit(free).with_for_update(skip_locked=True)))
    token = uuid.uuid4()
    return [_claimed(row, token) for row in transitions.claim_for_lane(session, ids, token, lease_seconds)]


def claimed_lane_task(session: Session, task_id: uuid.UUID, token: uuid.UUID) -> ClaimedTask | None:
    """The task claimed by the pump under `token`, if it still holds that lease."""
    row = session.execute(
        select(Task.id, Task.tenant_id, Task.job_id, Task.task_type, Task.tier, Task.request, Task.attempts,
               Task.task_metadata, Task.urgent)
        .where(Task.id == task_id, Task.status == TaskStatus.RUNNING, Task.lease_token == token)
    ).one_or_none()
    return _claimed(row, token) if row is not None else None


def _claimed(row: Any, token: uuid.UUID) -> ClaimedTask:
    return ClaimedTask(row.id, token, row.tenant_id, row.job_id, row.task_type, row.tier, row.request,
                       row.attempts, row.task_metadata or {}, row.urgent)
