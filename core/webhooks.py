"""Signed webhooks: a JSON POST whose raw body is signed with HMAC-SHA256 under a secret.

The receiver recomputes `hmac.new(secret, raw_body, sha256).hexdigest()` and compares it with the
`X-Tierbatch-Signature: sha256=<hex>` header (constant-time). Two things send them, through the same
code here:

- a schedule run (`schedule_run.finished`, core/schedules.py), signed with the schedule's secret;
- a bulk job with a `webhook_url` (`job.finished`, core/job_webhooks.py), signed with its tenant's secret.

**The outbox.** The subject row (a schedule run, a job) holds the delivery state: `webhook_status`
(`pending` → `delivered` | `failed`), the exact body to sign (`webhook_body`: every attempt sends the
same bytes) and when a message about it was last sent (the nudge). `webhook_deliveries` holds one row
per attempt, unique per (subject, attempt), written after the POST with its outcome. An attempt is
made only when no row for it (or a later one) exists, so a redelivered Celery message does nothing
once its attempt is recorded; failures come back with exponential backoff, up to `MAX_ATTEMPTS`; a
message lost with Redis is sent again by the beat tick once the nudge is stale. A worker killed between
the POST and its record makes the attempt again: the receiver may see a delivery twice (same
`X-Tierbatch-Delivery`), never two different events for one subject.

Nothing here commits; the worker tasks (worker/schedules.py, worker/job_webhooks.py) do, around the POST.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.models import Job, Schedule, ScheduleRun, Tenant, WebhookDelivery

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tierbatch-Signature"
EVENT_HEADER = "X-Tierbatch-Event"
DELIVERY_HEADER = "X-Tierbatch-Delivery"
MAX_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
TIMEOUT_SECONDS = 10.0
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(signature(secret, body), header.strip())


def backoff_seconds(attempt: int) -> float:
    """Delay before attempt `attempt + 1` after attempt `attempt` failed: 1, 2, 4, 8 … seconds."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_signed(url: str, body: bytes, secret: str, event: str, delivery_id: str,
                timeout: float = TIMEOUT_SECONDS) -> AttemptResult:
    """One POST; never raises for network or HTTP errors (they are the attempt's result)."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, body),
               EVENT_HEADER: event, DELIVERY_HEADER: delivery_id, "User-Agent": "tierbatch-webhook/1"}
    started = time.monotonic()
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:500], int((time.monotonic() - started) * 1000))
    elapsed = int((time.monotonic() - started) * 1000)
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}: {response.text[:300]}"
    return AttemptResult(response.status_code, error, elapsed)


def check_webhook_url(value: Any) -> str | None:
    """A `webhook_url` field: None, or an absolute http(s) URL with a host (InvalidInput naming the field)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("webhook_url: must be an http(s) URL", param="webhook_url", status_code=422)
    if len(value) > MAX_URL_CHARS:
        raise InvalidInput(f"webhook_url: at most {MAX_URL_CHARS} characters", param="webhook_url",
                           status_code=422)
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidInput("webhook_url: must not contain spaces or control characters (percent-encode them)",
                           param="webhook_url", status_code=422)
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise InvalidInput(f"webhook_url: {value!r} is not a valid URL", param="webhook_url",
                           status_code=422) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInput(f"webhook_url: {value!r} must be an http:// or https:// URL with a host",
                           param="webhook_url", status_code=422)
    return value


# --- the outbox: what to send, and the record of each attempt ------------------------------------------------

@dataclass(frozen=True, slots=True)
class WebhookCall:
    """One attempt to make: the stored body, signed with the secret read when the attempt is made."""

    kind: str
    subject_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    secret: str
    event: str

    @property
    def delivery_id(self) -> str:
        """`X-Tierbatch-Delivery`: the same for a repeated attempt, so a receiver can drop the repeat."""
        return f"{self.subject_id}:{self.attempt}"


TargetQuery = Select[uuid.UUID, str | None, str, str | None, str | None]  # tenant_id, url, secret, status, body


@dataclass(frozen=True)
class Outbox:
    """Where a kind of subject keeps its webhook state (columns of its row) and its attempts."""

    kind: str  # for logs
    event: str  # X-Tierbatch-Event, and the payload's event
    subject: Any  # the ORM class of the subject row (has `id`)
    status: Any  # its webhook_status column: pending | delivered | failed
    nudged: Any  # when a message about its webhook was last sent
    delivery_key: Any  # WebhookDelivery's column that points at the subject
    constraint: str  # UNIQUE (subject, attempt) of webhook_deliveries
    target: Callable[[uuid.UUID], TargetQuery]


def _schedule_run_target(run_id: uuid.UUID) -> TargetQuery:
    return (select(ScheduleRun.tenant_id, Schedule.webhook_url.label("url"), Schedule.webhook_secret.label("secret"),
                   ScheduleRun.webhook_status.label("status"), ScheduleRun.webhook_body.label("body"))
            .join(Schedule, Schedule.id == ScheduleRun.schedule_id).where(ScheduleRun.id == run_id))


def _job_target(job_id: uuid.UUID) -> TargetQuery:
    return (select(Job.tenant_id, Job.webhook_url.label("url"), Tenant.webhook_secret.label("secret"),
                   Job.webhook_status.label("status"), Job.webhook_body.label("body"))
            .join(Tenant, Tenant.id == Job.tenant_id).where(Job.id == job_id))


SCHEDULE_RUNS = Outbox("schedule run", "schedule_run.finished", ScheduleRun, ScheduleRun.webhook_status,
                       ScheduleRun.nudged_at, WebhookDelivery.run_id, "uq_webhook_deliveries_run_attempt",
                       _schedule_run_target)
JOBS = Outbox("job", "job.finished", Job, Job.webhook_status, Job.webhook_nudged_at, WebhookDelivery.job_id,
              "uq_webhook_deliveries_job_attempt", _job_target)


def call_to_make(session: Session, outbox: Outbox, subject_id: uuid.UUID, attempt: int) -> WebhookCall | None:
    """The call for this attempt, or None (nothing pending, or this attempt or a later one was made)."""
    row = session.execute(outbox.target(subject_id)).first()
    if row is None or row.status != "pending" or not row.body or not row.url:
        return None
    made = session.scalar(select(WebhookDelivery.id).where(outbox.delivery_key == subject_id,
                                                           WebhookDelivery.attempt >= attempt).limit(1))
    if made is not None:
        return None
    return WebhookCall(outbox.kind, subject_id, attempt, row.url, row.body.encode(), row.secret, outbox.event)


def record_attempt(session: Session, outbox: Outbox, call: WebhookCall, result: AttemptResult,
                   max_attempts: int = MAX_ATTEMPTS) -> float | None:
    """Store one attempt; returns the delay before the next one, or None (delivered, given up, duplicate)."""
    subject = outbox.subject
    # NO KEY UPDATE: rows that reference the subject (FOR KEY SHARE) are not blocked
    state = session.execute(select(subject.tenant_id, outbox.status).where(subject.id == call.subject_id)
                            .with_for_update(key_share=True)).first()
    if state is None:
        return None
    recorded = session.execute(
        pg_insert(WebhookDelivery).values(
            {outbox.delivery_key: call.subject_id, WebhookDelivery.tenant_id: state.tenant_id,
             WebhookDelivery.url: call.url, WebhookDelivery.attempt: call.attempt,
             WebhookDelivery.status_code: result.status_code, WebhookDelivery.error: result.error,
             WebhookDelivery.duration_ms: result.duration_ms})
        .on_conflict_do_nothing(constraint=outbox.constraint).returning(WebhookDelivery.id)
    ).scalar()
    if recorded is None or state[1] != "pending":
        return None
    delay: float | None = None
    status = "pending"
    if result.delivered:
        status = "delivered"
    elif call.attempt >= max_attempts:
        status = "failed"
        log.warning("%s %s: webhook to %s failed %d times; giving up", outbox.kind, call.subject_id, call.url,
                    call.attempt)
    else:
        delay = backoff_seconds(call.attempt)
    session.execute(update(subject).where(subject.id == call.subject_id)
                    .values({outbox.status: status, outbox.nudged: func.clock_timestamp()}))
    return delay


def resends_due(session: Session, outbox: Outbox, stale_seconds: float, limit: int = 200
                ) -> list[tuple[uuid.UUID, int]]:
    """Pending webhooks whose message is lost (no news for `stale_seconds`): (subject, next attempt)."""
    subject = outbox.subject
    now = func.now()
    stale = or_(outbox.nudged.is_(None), outbox.nudged < now - func.make_interval(0, 0, 0, 0, 0, 0, stale_seconds))
    pending = list(session.scalars(
        update(subject).where(subject.id.in_(
            select(subject.id).where(outbox.status == "pending", stale).limit(limit).scalar_subquery()))
        .values({outbox.nudged: now}).returning(subject.id)))
    if not pending:
        return []
    made: dict[uuid.UUID, int] = dict(session.execute(
        select(outbox.delivery_key, func.max(WebhookDelivery.attempt))
        .where(outbox.delivery_key.in_(pending)).group_by(outbox.delivery_key)).tuples().all())
    return [(subject_id, int(made.get(subject_id, 0)) + 1) for subject_id in pending]


def attempts_of(session: Session, outbox: Outbox, subject_ids: Sequence[uuid.UUID]
                ) -> dict[uuid.UUID, list[WebhookDelivery]]:
    out: dict[uuid.UUID, list[WebhookDelivery]] = {s: [] for s in subject_ids}
    if subject_ids:
        for row in session.scalars(select(WebhookDelivery).where(outbox.delivery_key.in_(subject_ids))
                                   .order_by(outbox.delivery_key, WebhookDelivery.attempt)):
            out[getattr(row, outbox.delivery_key.key)].append(row)
    return out


def deliver(call: WebhookCall, timeout: float = TIMEOUT_SECONDS) -> AttemptResult:
    """Make the attempt: one signed POST (never raises for network or HTTP errors)."""
    return post_signed(call.url, call.body, call.secret, call.event, call.delivery_id, timeout=timeout)
