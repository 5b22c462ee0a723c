"""How runs begin: fired by the beat exactly once, or asked for by hand; and the tick's housekeeping.

**Firing exactly once.** The beat tick (`fire_due`) takes the enabled schedules whose `next_fire_at` has
passed (`FOR UPDATE SKIP LOCKED`) and inserts a run keyed by (schedule, fire time) —
`UNIQUE(schedule_id, fire_time)` with `ON CONFLICT DO NOTHING` — so two beat processes, or a beat
restarted with stale state, never start the same run twice.
**Catch-up policy:** when the beat was down over several fire times, the next tick starts ONE run, for
the latest fire time that has passed (`fire_time` says which); the missed slots are not run one by one.
`next_fire_at` then moves to the first fire time after now.

Nothing here sends messages; worker/schedules.py does, after each commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from tierbatch.base.errors import Conflict
from tierbatch.base.states import LIVE_TASK_STATUSES, ScheduleRunPhase, ScheduleRunStatus
from tierbatch.db.models import Schedule, ScheduleRun, Task
from tierbatch.schedules.runs import RUNNING_PHASES
from tierbatch.schedules.spec import latest_fire_at_or_before, next_fire_after
from tierbatch.schedules.store import database_now, get_schedule
from tierbatch.webhooks.delivery import SCHEDULE_RUNS, resends_due

log = logging.getLogger(__name__)

# how long a message may go unanswered before the tick sends it again (lost in a Redis wipe or a crash)
RESEND_START_SECONDS = 60.0
RESEND_FINISH_SECONDS = 15.0
RESEND_WEBHOOK_SECONDS = 120.0


# --- firing ---------------------------------------------------------------------------------------------

def _insert_run(session: Session, schedule: Schedule, fire_time: datetime, trigger: str) -> uuid.UUID | None:
    """The run of (schedule, fire time), or None when it exists already (another beat made it)."""
    run_id: uuid.UUID | None = session.execute(
        pg_insert(ScheduleRun).values(
            id=uuid.uuid4(), schedule_id=schedule.id, tenant_id=schedule.tenant_id, fire_time=fire_time,
            trigger=trigger, status=ScheduleRunStatus.RUNNING, phase=ScheduleRunPhase.PENDING,
            task_count=0, skipped_count=0,
            nudged_at=func.now())
        .on_conflict_do_nothing(constraint="uq_schedule_runs_schedule_fire_time")
        .returning(ScheduleRun.id)
    ).scalar()
    return run_id


def fire_due(session: Session, now: datetime, limit: int = 500) -> list[uuid.UUID]:
    """Start the runs of every schedule due at `now` (one per schedule: the catch-up policy)."""
    due = session.scalars(
        select(Schedule).where(Schedule.enabled, Schedule.next_fire_at <= now)
        .order_by(Schedule.next_fire_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    created: list[uuid.UUID] = []
    for schedule in due:
        try:
            fire_time = latest_fire_at_or_before(schedule.cron, schedule.timezone, now)
            following = next_fire_after(schedule.cron, schedule.timezone, now)
        except Exception:  # a schedule that cannot be computed must not stop the others (nor the beat)
            log.exception("schedule %s: cannot compute its fire times; retried in an hour", schedule.id)
            schedule.next_fire_at = now + timedelta(hours=1)
            continue
        run_id = _insert_run(session, schedule, fire_time, "cron")
        if run_id is not None:
            created.append(run_id)
            log.info("schedule %s (%s): run %s for %s", schedule.id, schedule.name, run_id, fire_time.isoformat())
        schedule.next_fire_at = following
        if schedule.last_fire_at is None or fire_time > schedule.last_fire_at:
            schedule.last_fire_at = fire_time
    return created


def request_run(session: Session, tenant_id: uuid.UUID, schedule_id: uuid.UUID) -> ScheduleRun:
    """`POST /v1/schedules/{id}/run`: a manual run now (also for a disabled schedule)."""
    schedule = get_schedule(session, tenant_id, schedule_id)
    run_id = _insert_run(session, schedule, database_now(session), "manual")
    if run_id is None:  # two manual runs in the same microsecond: the other one is this run
        raise Conflict("a run of this schedule was just started; try again")
    run = session.get(ScheduleRun, run_id)
    assert run is not None
    return run



# --- the tick's housekeeping: messages that were lost -----------------------------------------------------

@dataclass
class Nudges:
    start: list[uuid.UUID] = field(default_factory=list)
    finish: list[uuid.UUID] = field(default_factory=list)
    webhooks: list[tuple[uuid.UUID, int]] = field(default_factory=list)


def runs_to_nudge(session: Session, limit: int = 200) -> Nudges:
    """Runs whose next step is due: finish when the job is done, and resends after a lost message."""
    nudges = Nudges()
    now = func.now()

    def stale(seconds: float) -> Any:
        return or_(ScheduleRun.nudged_at.is_(None),
                   ScheduleRun.nudged_at < now - func.make_interval(0, 0, 0, 0, 0, 0, seconds))

    nudges.start = list(session.scalars(
        update(ScheduleRun).where(ScheduleRun.id.in_(
            select(ScheduleRun.id).where(ScheduleRun.status == ScheduleRunStatus.RUNNING,
                                         ScheduleRun.phase == ScheduleRunPhase.PENDING,
                                         stale(RESEND_START_SECONDS)).limit(limit).scalar_subquery()))
        .values(nudged_at=now).returning(ScheduleRun.id)))
    current_job = func.coalesce(ScheduleRun.retry_job_id, ScheduleRun.job_id)
    live = exists().where(Task.tenant_id == ScheduleRun.tenant_id, Task.job_id == current_job,
                          Task.status.in_(LIVE_TASK_STATUSES))
    nudges.finish = list(session.scalars(
        update(ScheduleRun).where(ScheduleRun.id.in_(
            select(ScheduleRun.id).where(ScheduleRun.status == ScheduleRunStatus.RUNNING,
                                         ScheduleRun.phase.in_(RUNNING_PHASES),
                                         stale(RESEND_FINISH_SECONDS), ~live).limit(limit).scalar_subquery()))
        .values(nudged_at=now).returning(ScheduleRun.id)))
    nudges.webhooks = resends_due(session, SCHEDULE_RUNS, RESEND_WEBHOOK_SECONDS, limit)
    return nudges
