"""Job webhooks: one signed `job.finished` POST when every task of a bulk job with a `webhook_url` is terminal.

The POST is the schedule run's webhook (tierbatch/webhooks/delivery.py: HMAC-SHA256 of the raw body in
`X-Tierbatch-Signature`, backoff, one `webhook_deliveries` row per attempt), signed with the secret
of the job's tenant (`tenants.webhook_secret`, read when each attempt is made).

**Detection** (the beat tick, worker/job_webhooks.py), without scanning the world:

1. `jobs_to_notify`: the jobs that have a `webhook_url` and no claim yet — a partial index
   (`ix_jobs_webhook_unnotified`) holds only those, so jobs without a webhook and jobs already notified
   cost nothing — and no live task: for each, one probe of the tenant's live tasks (the predicate of
   the small partial index `ix_tasks_tenant_live`) that stops at the first task of the job it finds.
   At most `SCAN_LIMIT` jobs probed and `TICK_LIMIT` claimed per tick, oldest first.
2. `claim_notification`, one job per transaction: the job row is locked `FOR NO KEY UPDATE SKIP LOCKED`
   — the lock a request appending items by name (or an NDJSON upload) holds until it commits, so an
   append in flight makes the tick pass this job by for now — then the tasks are checked again with a
   fresh snapshot, the summary is computed, and the claim is a guarded
   `UPDATE jobs SET finished_notified_at = now(), webhook_status = 'pending', webhook_body = … WHERE id = …
   AND finished_notified_at IS NULL RETURNING id`. The exact body is stored with the claim, in the
   same transaction: a job is notified once, even when two ticks, a crash or a redelivered message run
   this twice; the sender only ever sends that stored body.

**Appending after the notification** (a request with the same `name`, or an NDJSON upload, once the job
was notified) is accepted, and its tasks run, but the job is NOT notified again: `job.finished` is sent
exactly once per job. Use a new name for work that needs its own notification; `GET /v1/jobs/{id}`
shows the current counts.

Nothing here commits and nothing sends messages: worker/job_webhooks.py does, after each commit.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, exists, func, literal, literal_column, select, text, update
from sqlalchemy.orm import Session

from tierbatch.base.states import LIVE_TASK_STATUSES, WebhookStatus, sql_in
from tierbatch.db.models import Job, Task
from tierbatch.jobs.read import JobSummary, summarize_jobs
from tierbatch.webhooks.delivery import JOBS

EVENT = JOBS.event  # "job.finished"
TICK_LIMIT = 100  # jobs claimed per tick at most; the rest wait for the next tick
SCAN_LIMIT = 1000  # unfinished jobs with a webhook probed per tick at most (oldest first)
RESEND_SECONDS = 120.0  # a pending webhook with no news for this long had its message lost: sent again

# literal, not bound: the partial index of live tasks matches only a predicate the planner can see
_LIVE_TASK = text(f"tasks.status IN {sql_in(LIVE_TASK_STATUSES)}")


def _live_task(tenant_id: ColumnElement[uuid.UUID], job_id: ColumnElement[uuid.UUID]) -> ColumnElement[bool]:
    """EXISTS a live task of the job: a probe of the tenant's live tasks (ix_tasks_tenant_live) that stops
    at the first one. `OFFSET 0` keeps it a per-job probe: without it Postgres may turn NOT EXISTS into
    an anti join that reads every live task of every tenant on each tick."""
    return exists(select(literal_column("1")).select_from(Task)
                  .where(Task.tenant_id == tenant_id, Task.job_id == job_id, _LIVE_TASK)
                  .offset(literal_column("0")))


def jobs_to_notify(session: Session, limit: int = TICK_LIMIT, scan: int = SCAN_LIMIT) -> list[uuid.UUID]:
    """Jobs with a webhook, not notified yet, whose tasks are all terminal (oldest first)."""
    waiting = (select(Job.id, Job.tenant_id, Job.created_at)
               .where(Job.webhook_url.is_not(None), Job.finished_notified_at.is_(None))  # ix_jobs_webhook_unnotified
               .order_by(Job.created_at).limit(scan).subquery("waiting"))
    return list(session.scalars(
        select(waiting.c.id).where(~_live_task(waiting.c.tenant_id, waiting.c.id))
        .order_by(waiting.c.created_at).limit(limit)))


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def job_payload(job: Job, summary: JobSummary) -> dict[str, Any]:
    """The `job.finished` body: the job's summary as `GET /v1/jobs/{id}` gives it when the job finished."""
    return {
        "event": EVENT, "job_id": str(job.id), "object": "job", "name": job.name, "status": summary.status,
        "counts": summary.counts, "task_count": summary.task_count,
        "cost_usd": _money(summary.cost_usd), "baseline_cost_usd": _money(summary.baseline_cost_usd),
        "savings_usd": _money(summary.savings_usd), "shadow_cost_usd": _money(summary.shadow_cost_usd),
        "unpriced_requests": summary.unpriced_requests,
        "created_at": _stamp(job.created_at), "finished_at": _stamp(summary.finished_at),
        "results_url": f"/v1/jobs/{job.id}/results",
    }


def encode_payload(payload: dict[str, Any]) -> str:
    """The exact text that is signed and sent (compact JSON, UTF-8)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def claim_notification(session: Session, job_id: uuid.UUID) -> bool:
    """Claim the job's `job.finished` webhook and store its body; False when it is not due or not ours."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.webhook_url.is_not(None),
                                           Job.finished_notified_at.is_(None))
                         .with_for_update(key_share=True, skip_locked=True))
    if job is None:  # claimed already, no webhook, or an append holds the row: the next tick sees it again
        return False
    # a statement after the lock: its snapshot has every append committed before the lock was taken
    if session.scalar(select(_live_task(literal(job.tenant_id), literal(job.id)))):
        return False
    body = encode_payload(job_payload(job, summarize_jobs(session, [job.id])[job.id]))
    claimed = session.execute(
        update(Job).where(Job.id == job_id, Job.finished_notified_at.is_(None))
        .values(finished_notified_at=func.clock_timestamp(), webhook_status=WebhookStatus.PENDING, webhook_body=body,
                webhook_nudged_at=func.clock_timestamp())
        .returning(Job.id).execution_options(synchronize_session=False)
    ).scalar()
    return claimed is not None
