"""The provider client: the only module that imports `openai`.

`openai.*` errors are mapped here, by type, to core.errors; nothing outside sees them.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from core.config import AppConfig
from core.errors import PermanentProviderError, ProviderError, RetryableProviderError
from core.pricing import TokenUsage

RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class ChatResult:
    provider: str
    requested_model: str
    served_model: str
    body: dict[str, Any]
    output: str
    usage: TokenUsage
    latency_ms: int


def usage_from_body(body: Mapping[str, Any]) -> TokenUsage:
    usage = body.get("usage") or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    input_tokens = int(usage.get("prompt_tokens") or 0)
    return TokenUsage(
        input_tokens=input_tokens,
        cached_tokens=min(int(prompt_details.get("cached_tokens") or 0), input_tokens),
        output_tokens=int(usage.get("completion_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def output_from_body(body: Mapping[str, Any]) -> str:
    choices = body.get("choices") or []
    if not choices:
        return ""
    message = choices[0].get("message") or {}
    return str(message.get("content") or "")


def parse_retry_after(headers: httpx.Headers) -> float | None:
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


def _message_of(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return exc.message


def map_openai_error(exc: openai.OpenAIError, provider: str, model: str) -> ProviderError:
    """Classify an openai SDK error by its type and status code, never by its text."""
    where = {"provider": provider, "model": model}
    if isinstance(exc, openai.APITimeoutError):
        return RetryableProviderError(f"{provider}/{model}: request timed out", **where)
    if isinstance(exc, openai.APIConnectionError):
        return RetryableProviderError(f"{provider}/{model}: connection failed: {exc}", **where)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        text = f"{provider}/{model}: HTTP {status}: {_message_of(exc)}"
        if status in RETRYABLE_STATUS or status >= 500:
            return RetryableProviderError(text, status_code=status,
                                          retry_after=parse_retry_after(exc.response.headers), **where)
        return PermanentProviderError(text, status_code=status, **where)
    return PermanentProviderError(f"{provider}/{model}: {type(exc).__name__}: {exc}", **where)


class ProviderClients:
    """One `openai.OpenAI` client per configured provider, created on first use."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._clients: dict[str, openai.OpenAI] = {}

    def client(self, provider: str) -> openai.OpenAI:
        if provider not in self._clients:
            provider_config = self._config.provider(provider)
            self._clients[provider] = openai.OpenAI(
                base_url=provider_config.base_url,
                api_key=self._config.api_key(provider),
                max_retries=0,  # retries and fallbacks are ours (core.retry), not the SDK's
                timeout=provider_config.timeout_seconds,
            )
        return self._clients[provider]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def chat(self, provider: str, model: str, request: Mapping[str, Any]) -> ChatResult:
        """One chat completion call; raises RetryableProviderError or PermanentProviderError."""
        started = time.perf_counter()
        try:
            completion = self.client(provider).chat.completions.create(model=model, **request)
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, provider, model) from exc
        latency_ms = int((time.perf_counter() - started) * 1000)
        body = completion.model_dump(mode="json", exclude_unset=True)
        return ChatResult(
            provider=provider,
            requested_model=model,
            served_model=str(body.get("model") or model),
            body=body,
            output=output_from_body(body),
            usage=usage_from_body(body),
            latency_ms=latency_ms,
        )
