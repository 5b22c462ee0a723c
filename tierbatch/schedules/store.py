"""Schedules stored: created, read, listed, changed and deleted; and their runs, read and listed."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import Conflict, InvalidInput, NotFound
from tierbatch.base.secretbox import SecretBox
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import Schedule, ScheduleRun
from tierbatch.schedules.spec import ScheduleSpec, TenantScope, invalid_field, next_fire_after, parse_schedule
from tierbatch.webhooks.signing import new_secret, require_secret_box

PATCH_KEYS = frozenset({"name", "cron", "timezone", "enabled", "job", "source", "sink", "webhook_url", "cursor"})


def database_now(session: Session) -> datetime:
    with session.no_autoflush:  # reading the clock needs no pending change written first
        value: datetime = session.scalar(select(func.clock_timestamp()))  # type: ignore[assignment]
    return value


def _name_taken(session: Session, tenant_id: uuid.UUID, name: str, other_than: uuid.UUID | None = None) -> None:
    query = select(Schedule.id).where(Schedule.tenant_id == tenant_id, Schedule.name == name)
    if other_than is not None:
        query = query.where(Schedule.id != other_than)
    if session.scalar(query) is not None:
        raise Conflict(f"name: a schedule named {name!r} already exists", param="name")


def create_schedule(session: Session, tenant_id: uuid.UUID, spec: ScheduleSpec, *,
                    box: SecretBox | None = None) -> tuple[Schedule, str | None]:
    """Store a validated schedule; returns it and its webhook secret (shown once, stored encrypted).
    Without a key (`box`) there is no secret, and a webhook_url is refused."""
    secret = new_secret() if box is not None else None
    if spec.webhook_url is not None:
        require_secret_box(box)
    _name_taken(session, tenant_id, spec.name)
    now = database_now(session)
    schedule = Schedule(
        id=uuid.uuid4(), tenant_id=tenant_id, name=spec.name, cron=spec.cron, timezone=spec.timezone,
        enabled=spec.enabled, job=spec.job, source=spec.source, sink=spec.sink, webhook_url=spec.webhook_url,
        webhook_secret_encrypted=box.seal(secret) if box is not None and secret else None, cursor=None,
        next_fire_at=next_fire_after(spec.cron, spec.timezone, now) if spec.enabled else None,
    )
    session.add(schedule)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(f"name: a schedule named {spec.name!r} already exists", param="name") from None
    return schedule, secret


def get_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID, *, lock: bool = False) -> Schedule:
    query = select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    schedule = session.scalar(query)
    if schedule is None:
        raise NotFound(f"no schedule {schedule_id}")
    return schedule


def list_schedules(session: Session, tenant_id: uuid.UUID, *, limit: int,
                   after: tuple[datetime, uuid.UUID] | None) -> list[Schedule]:
    """Newest first, keyset-paginated on (created_at, id); up to limit + 1 rows."""
    return newest_first_page(session, select(Schedule).where(Schedule.tenant_id == tenant_id), Schedule,
                             limit=limit, after=after)


def update_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID, payload: Any,
                    config: AppConfig, scope: TenantScope) -> Schedule:
    """PATCH: the given fields are validated like at creation; `"cursor": null` resets a SQL cursor."""
    if not isinstance(payload, dict) or not payload:
        raise InvalidInput("the body must be a JSON object with the fields to change", param=None)
    for key in payload:
        if key not in PATCH_KEYS:
            raise invalid_field(key, f"unknown or read-only field (changeable: {', '.join(sorted(PATCH_KEYS))})")
    schedule = get_schedule(session, tenant_id, schedule_id, lock=True)
    merged = {"name": schedule.name, "cron": schedule.cron, "timezone": schedule.timezone,
              "enabled": schedule.enabled, "job": schedule.job, "source": schedule.source, "sink": schedule.sink,
              "webhook_url": schedule.webhook_url}
    merged.update({k: v for k, v in payload.items() if k != "cursor"})
    if "enabled" in payload and not isinstance(payload["enabled"], bool):
        raise invalid_field("enabled", "must be true or false")
    spec = parse_schedule(merged, config, scope)
    if "cursor" in payload:
        if payload["cursor"] is not None:
            raise invalid_field("cursor", "only null is accepted: it resets the cursor (the next run reads from "
                                          "cursor_start)")
        schedule.cursor = None
    if spec.name != schedule.name:
        _name_taken(session, tenant_id, spec.name, other_than=schedule.id)
    timing_changed = (spec.cron, spec.timezone, spec.enabled) != (schedule.cron, schedule.timezone, schedule.enabled)
    schedule.name, schedule.cron, schedule.timezone = spec.name, spec.cron, spec.timezone
    schedule.enabled, schedule.job, schedule.source = spec.enabled, spec.job, spec.source
    schedule.sink, schedule.webhook_url = spec.sink, spec.webhook_url
    if timing_changed:
        schedule.next_fire_at = (next_fire_after(spec.cron, spec.timezone, database_now(session)) if spec.enabled
                                 else None)
    schedule.updated_at = database_now(session)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(f"name: a schedule named {spec.name!r} already exists", param="name") from None
    return schedule


def delete_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID) -> None:
    """The schedule, its runs, classifications and webhook attempts go; its jobs (and costs) stay."""
    schedule = get_schedule(session, tenant_id, schedule_id, lock=True)
    session.execute(delete(Schedule).where(Schedule.id == schedule.id))



# --- a schedule's runs, read --------------------------------------------------------------------------------

def list_runs(session: Session, schedule_id: uuid.UUID, *, limit: int,
              after: tuple[datetime, uuid.UUID] | None) -> list[ScheduleRun]:
    return newest_first_page(session, select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id),
                             ScheduleRun, limit=limit, after=after)


def get_run(session: Session, schedule: Schedule, run_id: uuid.UUID) -> ScheduleRun:
    run = session.scalar(select(ScheduleRun).where(ScheduleRun.id == run_id, ScheduleRun.schedule_id == schedule.id))
    if run is None:
        raise NotFound(f"no run {run_id} of schedule {schedule.id}")
    return run
