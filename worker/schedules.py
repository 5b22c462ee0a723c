"""Celery tasks of scheduled classification; the logic is in tierbatch/schedules/ (firing.py, runs.py).

- `tierbatch.schedules.tick` (beat, every few seconds): starts the runs of due schedules, sends
  `finish` for runs whose job is done, and sends again any step whose message was lost. It takes an
  optional `now` (ISO 8601) so tests can move the clock without waiting for real minutes.
- `tierbatch.schedules.run`: reads the source and creates the run's job, then dispatches its tasks.
- `tierbatch.schedules.finish`: retries invalid answers once, then writes results, sink and status.
- `tierbatch.schedules.webhook`: one signed POST; failures come back with exponential backoff (the attempt
  is worker/webhooks.py's `make_attempt`, shared with the job webhooks).

Every task takes a run id, locks the run row (SKIP LOCKED) and is safe to run twice.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Celery, shared_task
from celery import Task as CeleryTask

from tierbatch.base.messaging import (
    ASSEMBLE_BATCHES,
    DISPATCH_TASKS,
    SCHEDULE_FINISH,
    SCHEDULE_RUN,
    SCHEDULE_TICK,
    SCHEDULE_WEBHOOK,
)
from tierbatch.schedules.firing import fire_due, runs_to_nudge
from tierbatch.schedules.runs import RunStep, finish_run, queued_task_ids, start_run
from tierbatch.webhooks.delivery import SCHEDULE_RUNS
from tierbatch.worker.context import WorkerContext, context_of
from tierbatch.worker.webhooks import make_attempt

log = logging.getLogger(__name__)

WEBHOOK_EVENT = SCHEDULE_RUNS.event  # "schedule_run.finished"


def parse_now(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _after(app: Celery, ctx: WorkerContext, run_id: str, step: RunStep) -> None:
    """Send what a committed step calls for: the new job's tasks, or the webhook."""
    if step.dispatch_job is not None:
        messages = 0
        with ctx.sessions() as session, session.begin():
            for chunk in queued_task_ids(session, step.dispatch_job):
                app.send_task(DISPATCH_TASKS, args=[chunk])
                messages += 1
        # Light items may have been written straight into `waiting_batch`: the size trigger, as routing sends it
        app.send_task(ASSEMBLE_BATCHES)
        log.info("schedule run %s: %s, %d dispatch messages", run_id, step.state, messages)
    if step.webhook:
        app.send_task(SCHEDULE_WEBHOOK, args=[run_id, 1])


@shared_task(name=SCHEDULE_TICK, bind=True)
def tick(self: CeleryTask, now: str | None = None) -> dict[str, Any]:
    ctx = context_of(self.app)
    with ctx.sessions.begin() as session:
        fired = fire_due(session, parse_now(now))
    for run_id in fired:
        self.app.send_task(SCHEDULE_RUN, args=[str(run_id)])
    with ctx.sessions.begin() as session:
        nudges = runs_to_nudge(session)
    for run_id in nudges.start:
        self.app.send_task(SCHEDULE_RUN, args=[str(run_id)])
    for run_id in nudges.finish:
        self.app.send_task(SCHEDULE_FINISH, args=[str(run_id)])
    for run_id, attempt in nudges.webhooks:
        self.app.send_task(SCHEDULE_WEBHOOK, args=[str(run_id), attempt])
    if nudges.start or nudges.webhooks:
        log.info("schedules: sent again %d run starts and %d webhooks", len(nudges.start), len(nudges.webhooks))
    return {"fired": [str(r) for r in fired], "finish": [str(r) for r in nudges.finish]}


@shared_task(name=SCHEDULE_RUN, bind=True)
def run(self: CeleryTask, run_id: str) -> str:
    ctx = context_of(self.app)
    with ctx.sessions.begin() as session:
        step = start_run(session, uuid.UUID(run_id), ctx.config, environ=os.environ,
                         own_database_url=ctx.settings.database_url)
    _after(self.app, ctx, run_id, step)
    return step.state


@shared_task(name=SCHEDULE_FINISH, bind=True)
def finish(self: CeleryTask, run_id: str) -> str:
    ctx = context_of(self.app)
    with ctx.sessions.begin() as session:
        step = finish_run(session, uuid.UUID(run_id), ctx.config)
    _after(self.app, ctx, run_id, step)
    return step.state


@shared_task(name=SCHEDULE_WEBHOOK, bind=True)
def webhook(self: CeleryTask, run_id: str, attempt: int = 1) -> str:
    return make_attempt(self.app, SCHEDULE_RUNS, run_id, attempt, SCHEDULE_WEBHOOK)
