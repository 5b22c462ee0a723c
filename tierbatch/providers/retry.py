"""Retry policy for immediate calls: retry retryable errors with backoff honouring
`retry-after`, then fall back along the tier's ordered chain."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tierbatch.base.config import ImmediateConfig, ModelRef
from tierbatch.base.errors import ChainExhausted, PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.providers.adapter import ChatResult

ChatCall = Callable[[str, str, Mapping[str, Any]], ChatResult]


def backoff_delay(policy: ImmediateConfig, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff, or the provider's `retry-after` when it gave one; capped."""
    delay = retry_after if retry_after is not None else policy.backoff_base_seconds * (2 ** attempt)
    return min(delay, policy.backoff_max_seconds)


def call_with_fallbacks(call: ChatCall, chain: Sequence[ModelRef], request: Mapping[str, Any],
                        policy: ImmediateConfig, sleep: Callable[[float], None]) -> ChatResult:
    errors: list[ProviderError] = []
    for ref in chain:
        for attempt in range(policy.retries_per_model + 1):
            try:
                return call(ref.provider, ref.model, request)
            except PermanentProviderError as exc:
                errors.append(exc)
                break  # the same model will answer the same way: try the next one
            except RetryableProviderError as exc:
                errors.append(exc)
                if attempt < policy.retries_per_model:
                    sleep(backoff_delay(policy, attempt, exc.retry_after))
    raise ChainExhausted(errors)
