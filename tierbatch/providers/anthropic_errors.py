"""Anthropic SDK errors as tierbatch.base.errors, by type and status (`tierbatch.providers.error_mapping`):
429, 5xx and 529, and an `overloaded_error` whatever its status, are retryable (`retry-after` kept), as
are timeouts (`timed_out`) and broken connections; other 4xx are permanent.
"""

from __future__ import annotations

from collections.abc import Mapping

import anthropic

from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.providers.error_mapping import classified, error_message

OVERLOADED = "overloaded_error"


def error_type(body: object) -> str | None:
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and isinstance(inner.get("type"), str):
            return str(inner["type"])
    return None


def map_anthropic_error(exc: anthropic.AnthropicError, provider: str, model: str) -> ProviderError:
    """Classify an anthropic SDK error by its type and status code, never by its text."""
    if isinstance(exc, anthropic.APITimeoutError):
        return RetryableProviderError(f"{provider}/{model}: request timed out", provider=provider, model=model,
                                      timed_out=True)
    if isinstance(exc, anthropic.APIConnectionError):
        return RetryableProviderError(f"{provider}/{model}: connection failed: {exc}", provider=provider,
                                      model=model)
    if isinstance(exc, anthropic.APIStatusError):
        message = error_message(exc.body) or exc.message
        return classified(exc.status_code, message, exc.response.headers, provider, model,
                          retryable=error_type(exc.body) == OVERLOADED)
    return PermanentProviderError(f"{provider}/{model}: {type(exc).__name__}: {exc}", provider=provider,
                                  model=model)
