"""Signed webhooks: a JSON POST whose raw body is signed with HMAC-SHA256 under a per-schedule secret.

The receiver recomputes `hmac.new(secret, raw_body, sha256).hexdigest()` and compares it with the
`X-Tierbatch-Signature: sha256=<hex>` header (constant-time). Deliveries are retried with exponential
backoff and every attempt is recorded (core/schedules.py keeps the rows).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import httpx

SIGNATURE_HEADER = "X-Tierbatch-Signature"
EVENT_HEADER = "X-Tierbatch-Event"
DELIVERY_HEADER = "X-Tierbatch-Delivery"
MAX_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
TIMEOUT_SECONDS = 10.0
SECRET_PREFIX = "whsec_"


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
