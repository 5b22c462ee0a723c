"""Signed webhooks to public addresses: a JSON POST signed with the Standard Webhooks scheme
(tierbatch/webhooks/signing.py), connected only to addresses `TargetPolicy` checked
(tierbatch/webhooks/targets.py); `X-Tierbatch-Event` names the event. Two things send them, through
the same code here:

- a schedule run (`schedule_run.finished`, tierbatch/schedules/run_webhooks.py), signed with the schedule's secret;
- a bulk job with a `webhook_url` (`job.finished`, tierbatch/jobs/webhooks.py), signed with its tenant's secret.

Secrets are stored encrypted (tierbatch/base/secretbox.py, key `TIERBATCH_SECRET_KEY`) and decrypted when an
attempt is made.

**What is kept of the answer.** Only its status code and the time taken: the body is read up to
`[webhooks] max_response_bytes` and dropped, and the whole attempt (resolving, connecting, sending,
reading) has one deadline, `[webhooks] timeout_seconds`.

**The outbox.** The subject row (a schedule run, a job) holds the delivery state: `webhook_status`
(`pending` → `delivered` | `failed`), the exact body to sign (`webhook_body`: every attempt sends the
same bytes) and when a message about it was last sent (the nudge). `webhook_deliveries` holds one row
per attempt, unique per (subject, attempt), written after the POST with its outcome. An attempt is
made only when no row for it (or a later one) exists, so a redelivered Celery message does nothing
once its attempt is recorded; failures come back with exponential backoff, up to `MAX_ATTEMPTS`; a
message lost with Redis is sent again by the beat tick once the nudge is stale. A worker killed between
the POST and its record makes the attempt again: the receiver may see a delivery twice (same
`webhook-id`), never two different events for one subject.

Nothing here commits; the worker tasks (worker/schedules.py, worker/webhooks.py) do, around the POST.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from tierbatch.base.config import WebhooksConfig
from tierbatch.base.secretbox import ENV_NAME as SECRET_KEY_ENV
from tierbatch.base.secretbox import SecretBox, SecretUnreadable
from tierbatch.base.states import WebhookStatus
from tierbatch.db.models import Job, Schedule, ScheduleRun, Tenant, WebhookDelivery
from tierbatch.metrics.catalog import WEBHOOK_DELIVERIES
from tierbatch.metrics.commit import after_commit
from tierbatch.webhooks.signing import signed_headers
from tierbatch.webhooks.targets import BlockedTarget, PinnedTransport, Resolver, TargetPolicy

log = logging.getLogger(__name__)

EVENT_HEADER = "X-Tierbatch-Event"
ATTEMPT_HEADER = "X-Tierbatch-Attempt"
MAX_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0


def backoff_seconds(attempt: int) -> float:
    """Delay before attempt `attempt + 1` after attempt `attempt` failed: 1, 2, 4, 8 … seconds."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What is kept of an attempt: the status code, the time, and our own reason (never the answer's body)."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# --- the outbox: what to send, and the record of each attempt ------------------------------------------------

@dataclass(frozen=True, slots=True)
class WebhookCall:
    """One attempt to make: the stored body, signed with the secret read when the attempt is made."""

    kind: str
    subject_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    secret: str | None  # decrypted; None when it cannot be (`secret_problem` says why)
    event: str
    secret_problem: str | None = None

    @property
    def message_id(self) -> str:
        """`webhook-id`: one per subject, the same on every attempt, so a receiver can drop the repeats."""
        return f"msg_{self.subject_id.hex}"


TargetQuery = Select[uuid.UUID, str | None, str | None, str | None, str | None]  # tenant, url, secret, status, body


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
    return (select(ScheduleRun.tenant_id, Schedule.webhook_url.label("url"),
                   Schedule.webhook_secret_encrypted.label("secret"),
                   ScheduleRun.webhook_status.label("status"), ScheduleRun.webhook_body.label("body"))
            .join(Schedule, Schedule.id == ScheduleRun.schedule_id).where(ScheduleRun.id == run_id))


def _job_target(job_id: uuid.UUID) -> TargetQuery:
    return (select(Job.tenant_id, Job.webhook_url.label("url"), Tenant.webhook_secret_encrypted.label("secret"),
                   Job.webhook_status.label("status"), Job.webhook_body.label("body"))
            .join(Tenant, Tenant.id == Job.tenant_id).where(Job.id == job_id))


SCHEDULE_RUNS = Outbox("schedule run", "schedule_run.finished", ScheduleRun, ScheduleRun.webhook_status,
                       ScheduleRun.nudged_at, WebhookDelivery.run_id, "uq_webhook_deliveries_run_attempt",
                       _schedule_run_target)
JOBS = Outbox("job", "job.finished", Job, Job.webhook_status, Job.webhook_nudged_at, WebhookDelivery.job_id,
              "uq_webhook_deliveries_job_attempt", _job_target)


def _open_secret(sealed: str | None, box: SecretBox | None, kind: str) -> tuple[str | None, str | None]:
    """(secret, None), or (None, why it cannot be used): recorded as the attempt's failure."""
    owner = "tenant" if kind == "job" else "schedule"
    if sealed is None:
        return None, (f"the {owner} has no webhook secret (set one: POST /v1/admin/tenants/{{id}}/webhook-secret)"
                      if owner == "tenant" else "the schedule has no webhook secret (stored before encryption)")
    if box is None:
        return None, f"{SECRET_KEY_ENV} is not set on the worker: the webhook secret cannot be read"
    try:
        return box.open(sealed), None
    except SecretUnreadable as exc:
        return None, str(exc)


def call_to_make(session: Session, outbox: Outbox, subject_id: uuid.UUID, attempt: int,
                 box: SecretBox | None) -> WebhookCall | None:
    """The call for this attempt, or None (nothing pending, or this attempt or a later one was made)."""
    row = session.execute(outbox.target(subject_id)).first()
    if row is None or row.status != WebhookStatus.PENDING or not row.body or not row.url:
        return None
    made = session.scalar(select(WebhookDelivery.id).where(outbox.delivery_key == subject_id,
                                                           WebhookDelivery.attempt >= attempt).limit(1))
    if made is not None:
        return None
    secret, problem = _open_secret(row.secret, box, outbox.kind)
    return WebhookCall(outbox.kind, subject_id, attempt, row.url, row.body.encode(), secret, outbox.event, problem)


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
    if recorded is None or state[1] != WebhookStatus.PENDING:
        return None
    delay: float | None = None
    status = WebhookStatus.PENDING
    if result.delivered:
        status = WebhookStatus.DELIVERED
    elif call.attempt >= max_attempts:
        status = WebhookStatus.FAILED
        log.warning("%s %s: webhook to %s failed %d times; giving up", outbox.kind, call.subject_id, call.url,
                    call.attempt)
    else:
        delay = backoff_seconds(call.attempt)
    session.execute(update(subject).where(subject.id == call.subject_id)
                    .values({outbox.status: status, outbox.nudged: func.clock_timestamp()}))
    outcome = "delivered" if result.delivered else "retrying" if delay is not None else "gave_up"
    kind = outbox.kind.replace(" ", "_")
    after_commit(session, lambda: WEBHOOK_DELIVERIES.labels(kind, outcome).inc())
    return delay


def resends_due(session: Session, outbox: Outbox, stale_seconds: float, limit: int = 200
                ) -> list[tuple[uuid.UUID, int]]:
    """Pending webhooks whose message is lost (no news for `stale_seconds`): (subject, next attempt)."""
    subject = outbox.subject
    now = func.now()
    stale = or_(outbox.nudged.is_(None), outbox.nudged < now - func.make_interval(0, 0, 0, 0, 0, 0, stale_seconds))
    pending = list(session.scalars(
        update(subject).where(subject.id.in_(
            select(subject.id).where(outbox.status == WebhookStatus.PENDING, stale).limit(limit).scalar_subquery()))
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


def _failure(exc: httpx.HTTPError) -> str:
    """Our own words for a network failure: nothing the receiver sent is quoted."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect (ConnectError)"
    return f"request failed ({type(exc).__name__})"


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield


async def _post(call: WebhookCall, policy: TargetPolicy, timeout: float, max_response_bytes: int,
                transport: httpx.AsyncBaseTransport | None, now: Callable[[], datetime]) -> AttemptResult:
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    if call.secret is None:
        return AttemptResult(None, f"not sent: {call.secret_problem}", 0)
    try:
        signed = signed_headers(call.secret, call.message_id, now(), call.body)
    except ValueError as exc:
        return AttemptResult(None, f"not sent: {exc}", 0)
    headers = {"Content-Type": "application/json", "User-Agent": "tierbatch-webhook/2", EVENT_HEADER: call.event,
               ATTEMPT_HEADER: str(call.attempt), **signed}
    try:
        # one deadline for the whole attempt (resolve, connect, send, read), not one per read
        async with asyncio.timeout(timeout), httpx.AsyncClient(
                transport=PinnedTransport(policy, transport), timeout=timeout, follow_redirects=False,
                trust_env=False) as client, client.stream("POST", call.url, content=call.body,
                                                          headers=headers) as response:
            received = 0
            # read a little, keep nothing (an answer built in memory, as by a test transport, is not a stream)
            chunks = response.aiter_raw() if not response.is_stream_consumed else _nothing()
            async for chunk in chunks:
                received += len(chunk)
                if received >= max_response_bytes:
                    break
            status = response.status_code
    except TimeoutError:
        return AttemptResult(None, f"timed out: no complete answer within {timeout:g} s", took())
    except BlockedTarget as exc:
        return AttemptResult(None, f"not sent: {exc} (webhooks are only sent to public addresses)", took())
    except httpx.HTTPError as exc:
        return AttemptResult(None, _failure(exc), took())
    return AttemptResult(status, None if 200 <= status < 300 else f"HTTP {status}", took())


def deliver(call: WebhookCall, config: WebhooksConfig, *, resolver: Resolver | None = None,
            transport: httpx.AsyncBaseTransport | None = None,
            now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> AttemptResult:
    """Make the attempt: one signed POST to a checked address (never raises for network or HTTP errors).
    `resolver` and `transport` are seams for tests (DNS answers, and a transport instead of the network)."""
    policy = TargetPolicy.from_config(config, resolver)
    return asyncio.run(_post(call, policy, config.timeout_seconds, config.max_response_bytes, transport, now))
