"""Signed webhooks to public addresses: a JSON POST signed with the Standard Webhooks scheme.

Headers (https://www.standardwebhooks.com, the `standardwebhooks` package): `webhook-id` (one per
subject: the same on every retry, so a receiver drops repeats), `webhook-timestamp` (Unix seconds of
this attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`) under a
`whsec_<base64>` secret; `X-Tierbatch-Event` names the event. A receiver verifies with
`standardwebhooks.Webhook(secret).verify(body, headers)`, which also refuses stale timestamps
(replays). Two things send them, through the same code here:

- a schedule run (`schedule_run.finished`, tierbatch/schedules/run_webhooks.py), signed with the schedule's secret;
- a bulk job with a `webhook_url` (`job.finished`, tierbatch/jobs/webhooks.py), signed with its tenant's secret.

Secrets are stored encrypted (tierbatch/base/secretbox.py, key `TIERBATCH_SECRET_KEY`) and decrypted when an
attempt is made.

**Where they may go.** A tenant names the URL, so it is checked twice against `TargetPolicy`: when it
is given (a 422 naming `webhook_url`) and when each attempt connects. The host is resolved once, every
address is checked (loopback, private, link-local, multicast, reserved, unspecified, shared and
site-local addresses are refused, IPv4 in any spelling and IPv4 inside IPv6 too) and the connection
goes to a checked address, with the original `Host` header and, for https, the hostname as SNI and
for certificate verification: a DNS answer that changes between the check and the connection
(rebinding) cannot send it elsewhere. `[webhooks] allow_private_networks = true` lets operators
use internal receivers. Redirects are not followed and proxies from the environment are not used.

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
import base64
import binascii
import ipaddress
import logging
import secrets
import socket
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
from standardwebhooks.webhooks import Webhook

from tierbatch.base.config import WebhooksConfig
from tierbatch.base.errors import InvalidValue, TierbatchError
from tierbatch.base.secretbox import ENV_NAME as SECRET_KEY_ENV
from tierbatch.base.secretbox import SecretBox, SecretUnreadable
from tierbatch.base.states import WebhookStatus
from tierbatch.db.models import Job, Schedule, ScheduleRun, Tenant, WebhookDelivery

log = logging.getLogger(__name__)

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "X-Tierbatch-Event"
ATTEMPT_HEADER = "X-Tierbatch-Attempt"
MAX_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> addresses, as text

# IPv4 carried inside IPv6: checked as the IPv4 address it reaches (NAT64, RFC 6052)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def new_secret() -> str:
    """`whsec_` and 32 random bytes in standard base64: the Standard Webhooks secret format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signed_headers(secret: str, message_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for `body` (ValueError for a secret that cannot sign)."""
    try:
        signer = Webhook(secret)
    except (binascii.Error, ValueError, RuntimeError) as exc:  # EmptyWebhookSecretError is a RuntimeError
        raise ValueError("the webhook secret is not in the whsec_<base64> format: rotate it") from exc
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(int(at.timestamp())),
            SIGNATURE_HEADER: signer.sign(message_id, at, body.decode("utf-8"))}


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


# --- where a webhook may go --------------------------------------------------------------------------------

class BlockedTarget(TierbatchError):
    """The URL's host is not (only) public addresses, or does not resolve."""


def system_resolver(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself: IPv6, dotted IPv4 and the other spellings the C library
    accepts (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`), or None for a name."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not text or not all(c.isalnum() or c == "." for c in text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def address_problem(ip: IPAddress, allow_private_networks: bool = False) -> str | None:
    """Why a webhook may not go to `ip` (a short phrase), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded, allow_private_networks)
            if inner is not None:
                return f"{inner} (IPv4 {embedded} inside IPv6)"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if allow_private_networks:
        return None
    for flag, phrase in (("is_loopback", "a loopback address"), ("is_link_local", "a link-local address"),
                         ("is_private", "a private address"), ("is_reserved", "a reserved address"),
                         ("is_site_local", "a site-local address")):
        if getattr(ip, flag, False):
            return phrase
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class TargetPolicy:
    """Which hosts a webhook may reach; `resolver` is the seam for DNS (tests inject one)."""

    allow_private_networks: bool = False
    resolver: Resolver = system_resolver

    @classmethod
    def from_config(cls, config: WebhooksConfig, resolver: Resolver | None = None) -> TargetPolicy:
        return cls(config.allow_private_networks, resolver or system_resolver)

    def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve `host` once; every address must pass (BlockedTarget), and these are the ones to use."""
        name = host.rstrip(".").lower()
        literal = literal_address(name)
        if literal is not None:
            problem = address_problem(literal, self.allow_private_networks)
            if problem is not None:
                raise BlockedTarget(f"{host} is {problem}")
            return [literal]
        refused = f"{host} does not resolve to public addresses only"
        if not self.allow_private_networks and (name == "localhost" or name.endswith(".localhost")):
            raise BlockedTarget(refused)
        try:
            found = [ipaddress.ip_address(str(a).split("%", 1)[0]) for a in self.resolver(name, port)]
        except (OSError, UnicodeError, ValueError):
            raise BlockedTarget(f"{host} does not resolve") from None
        # the resolved addresses are not named: an error must not map a tenant's view of internal DNS
        if not found or any(address_problem(ip, self.allow_private_networks) for ip in found):
            raise BlockedTarget(refused)
        return found

    def check_url(self, value: Any) -> str | None:
        """A `webhook_url` as given: its form, then where it goes (InvalidInput 422 naming the field)."""
        url = check_webhook_url(value)
        if url is None:
            return None
        parsed = httpx.URL(url)
        try:
            self.addresses(_ascii_host(parsed), parsed.port or (443 if parsed.scheme == "https" else 80))
        except BlockedTarget as exc:
            raise InvalidValue(f"webhook_url: {exc}; webhooks are only sent to public addresses",
                               param="webhook_url") from None
        return url


def _ascii_host(url: httpx.URL) -> str:
    """The host as DNS and TLS see it (IDNA-encoded), without IPv6 brackets."""
    return url.raw_host.decode("ascii")


def require_secret_box(box: SecretBox | None) -> SecretBox:
    """Webhooks need a key to keep their secrets: a 422 naming the field when the server has none."""
    if box is None:
        raise InvalidValue(f"webhook_url: webhooks are not enabled on this server ({SECRET_KEY_ENV} is not set)",
                           param="webhook_url")
    return box


class PinnedTransport(httpx.AsyncBaseTransport):
    """Connects only to the addresses the policy checked for the request's host, resolved once here.

    The request goes to the address itself; its `Host` header stays the original one, and for https the
    hostname is the SNI name and the name the certificate is verified against (httpcore's
    `sni_hostname` extension)."""

    def __init__(self, policy: TargetPolicy, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpx.AsyncHTTPTransport(retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = _ascii_host(url)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await asyncio.to_thread(self.policy.addresses, host, port)
        last: httpx.ConnectError | None = None
        for ip in addresses:
            extensions = dict(request.extensions)
            if url.scheme == "https" and literal_address(host) is None:
                extensions["sni_hostname"] = host
            pinned = httpx.Request(request.method, url.copy_with(host=str(ip)), headers=request.headers,
                                   stream=request.stream, extensions=extensions)
            try:
                return await self.inner.handle_async_request(pinned)
            except httpx.ConnectError as exc:  # the next checked address, if any
                last = exc
        assert last is not None
        raise last

    async def aclose(self) -> None:
        await self.inner.aclose()


def check_webhook_url(value: Any) -> str | None:
    """A `webhook_url` field: None, or an absolute http(s) URL with a host (InvalidInput naming the field).
    Its form only; `TargetPolicy.check_url` also checks where it goes."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue("webhook_url: must be an http(s) URL", param="webhook_url")
    if len(value) > MAX_URL_CHARS:
        raise InvalidValue(f"webhook_url: at most {MAX_URL_CHARS} characters", param="webhook_url")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidValue("webhook_url: must not contain spaces or control characters (percent-encode them)",
                           param="webhook_url")
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise InvalidValue(f"webhook_url: {value!r} is not a valid URL", param="webhook_url") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidValue(f"webhook_url: {value!r} must be an http:// or https:// URL with a host",
                           param="webhook_url")
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
