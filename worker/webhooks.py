"""Celery tasks of the job webhooks (tierbatch/jobs/webhooks.py), and the attempt every signed webhook makes.

- `tierbatch.jobs.webhook_tick` (beat, every few seconds): claims the finished jobs that have a
  `webhook_url` (one transaction each), sends their first attempt, and sends again the attempts whose
  message was lost (a pending webhook with no news for a while).
- `tierbatch.jobs.webhook`: one signed POST; a failure comes back with exponential backoff. Attempts run
  on the `webhooks` queue of their own: a slow receiver holds a webhook slot, never the dispatch work.

`make_attempt` is shared with the schedule runs' webhook (worker/schedules.py): read the call in one
transaction, POST outside any transaction, record the outcome in another.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery, shared_task
from celery import Task as CeleryTask

from tierbatch.base.messaging import JOB_WEBHOOK, JOB_WEBHOOK_TICK
from tierbatch.jobs.webhooks import RESEND_SECONDS, claim_notification, jobs_to_notify
from tierbatch.webhooks.delivery import JOBS, Outbox, call_to_make, deliver, record_attempt, resends_due
from tierbatch.worker.context import context_of

log = logging.getLogger(__name__)


def make_attempt(app: Celery, outbox: Outbox, subject_id: str, attempt: int, task_name: str) -> str:
    """One attempt of a subject's webhook; the next one is sent with its backoff when this one fails."""
    ctx = context_of(app)
    with ctx.sessions.begin() as session:
        call = call_to_make(session, outbox, uuid.UUID(subject_id), attempt, ctx.secret_box)
    if call is None:
        return "nothing to send"
    result = deliver(call, ctx.config.webhooks)
    with ctx.sessions.begin() as session:
        delay = record_attempt(session, outbox, call, result)
    if delay is not None:
        log.info("%s %s: webhook attempt %d failed (%s); next in %.0fs", outbox.kind, subject_id, attempt,
                 result.error, delay)
        app.send_task(task_name, args=[subject_id, attempt + 1], countdown=delay)
    return "delivered" if result.delivered else f"attempt {attempt} failed"


@shared_task(name=JOB_WEBHOOK_TICK, bind=True)
def job_webhook_tick(self: CeleryTask) -> dict[str, Any]:
    ctx = context_of(self.app)
    with ctx.sessions.begin() as session:
        candidates = jobs_to_notify(session)
    claimed: list[str] = []
    for job_id in candidates:
        with ctx.sessions.begin() as session:
            won = claim_notification(session, job_id)
        if won:  # committed: a lost message is sent again by a later tick (resends_due)
            claimed.append(str(job_id))
            self.app.send_task(JOB_WEBHOOK, args=[str(job_id), 1])
    with ctx.sessions.begin() as session:
        resends = resends_due(session, JOBS, RESEND_SECONDS)
    for job_id, attempt in resends:
        self.app.send_task(JOB_WEBHOOK, args=[str(job_id), attempt])
    if claimed or resends:
        log.info("job webhooks: %d jobs finished, %d attempts sent again", len(claimed), len(resends))
    return {"notified": claimed, "resent": [str(j) for j, _ in resends]}


@shared_task(name=JOB_WEBHOOK, bind=True)
def job_webhook(self: CeleryTask, job_id: str, attempt: int = 1) -> str:
    return make_attempt(self.app, JOBS, job_id, attempt, JOB_WEBHOOK)
