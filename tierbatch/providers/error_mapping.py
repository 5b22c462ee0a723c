"""Provider error answers classified by status code, the rule every provider kind shares: 408/409/429
and 5xx (Anthropic's 529 `overloaded_error` too) are worth retrying, after the provider's `retry-after`;
other 4xx are not. Timeouts and broken connections are retryable, a timeout flagged `timed_out`.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping

import httpx2

from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError

RETRYABLE_STATUS = frozenset({408, 409, 429})

def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(parsed.timestamp() - time.time(), 0.0)


def error_message(body: object) -> str | None:
    """`error.message` of an error body (OpenAI's and Anthropic's alike), if it has one."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return None


def error_text(content: bytes, content_type: str | None) -> str:
    """`error.message` of an error body. A body without one (plain text, an HTML page, a server's
    traceback) is not repeated: it may hold internals, and the message reaches clients (task errors, the
    gateway's error bodies); it is said what came instead."""
    text = content.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message = error_message(body)
    if message is not None:
        return message
    if not text:
        return "the provider answered with an empty body"
    kind = (content_type or "").split(";")[0].strip() or "no content type"
    shape = "a JSON body without an error message" if body is not None else "a body that is not JSON"
    return f"the provider answered with {shape} ({kind}, {len(content)} bytes)"


def status_error(status: int, headers: Mapping[str, str], content: bytes, provider: str, model: str, *,
                 retryable: bool = False) -> ProviderError:
    """A provider's error answer, classified by its status code like the SDK error mappings do."""
    return classified(status, error_text(content, headers.get("content-type")), headers, provider, model,
                      retryable=retryable)


def classified(status: int, message: str, headers: Mapping[str, str], provider: str, model: str, *,
               retryable: bool = False) -> ProviderError:
    """408/409/429 and 5xx are worth retrying (with the provider's `retry-after`); other 4xx are not,
    unless the kind knows better from the error's type (`retryable`)."""
    text = f"{provider}/{model}: HTTP {status}: {message}"
    if retryable or status in RETRYABLE_STATUS or status >= 500:
        return RetryableProviderError(text, status_code=status, provider=provider, model=model,
                                      retry_after=parse_retry_after(headers))
    return PermanentProviderError(text, status_code=status, provider=provider, model=model)


def transport_error(exc: Exception, provider: str, model: str) -> ProviderError:
    """An `httpx2` error on the way to the provider: retryable, a timeout flagged as such."""
    if isinstance(exc, httpx2.TimeoutException):
        return RetryableProviderError(f"{provider}/{model}: request timed out", provider=provider,
                                      model=model, timed_out=True)
    return RetryableProviderError(f"{provider}/{model}: connection failed: {type(exc).__name__}: {exc}",
                                  provider=provider, model=model)
