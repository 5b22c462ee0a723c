"""The provider clients: one connection per configured provider, each call dispatched to the adapter of
the provider's kind (`ProviderConfig.kind`, `tierbatch.providers.adapter.ProviderAdapter`).

Callers speak OpenAI's chat completion shape whatever the kind: requests in, answer bodies, stream
chunks and batch output lines out. The SDKs (`openai`, `anthropic`) are imported by the adapters
alone, inside this package; their errors reach callers only as tierbatch.base.errors.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx2

from tierbatch.base.config import AppConfig, ProviderConfig, ProviderKind
from tierbatch.metrics.calls import timed_call
from tierbatch.metrics.catalog import Surface
from tierbatch.providers.adapter import (
    BatchAdapter,
    ChatResult,
    ChatStream,
    ProviderAdapter,
    ProviderBatchInfo,
    RawChatAnswer,
    Target,
)
from tierbatch.providers.cache_keys import prompt_cache_key
from tierbatch.providers.openai_adapter import OpenAIAdapter


@functools.cache
@functools.cache
def adapter_for(kind: ProviderKind) -> ProviderAdapter[Any, Any]:
    """The adapter of a provider kind: stateless, so one per kind for the process, made on first use
    (not once per call on the gateway's hot path)."""
    if kind == "anthropic":
        # imported on first use: the `anthropic` SDK takes a second or two of CPU to import, paid only by
        # processes that call a provider of this kind
        from tierbatch.providers.anthropic_adapter import AnthropicAdapter

        return AnthropicAdapter()
    return OpenAIAdapter()


class ProviderClients:
    """The worker's calls: one SDK client per configured provider, created on first use, of its kind.
    `transport` replaces the network (tests: `httpx2.MockTransport`); without it the SDK makes its own
    HTTP client."""

    def __init__(self, config: AppConfig, *, transport: httpx2.BaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self._clients: dict[str, Any] = {}

    def adapter(self, provider: str) -> ProviderAdapter[Any, Any]:
        return adapter_for(self._config.provider(provider).kind)

    def settings(self, provider: str) -> ProviderConfig:
        return self._config.provider(provider)

    def client(self, provider: str) -> Any:
        """The provider's SDK client (of its kind's adapter)."""
        if provider not in self._clients:
            settings = self._config.provider(provider)
            self._clients[provider] = adapter_for(settings.kind).sync_client(
                settings, self._config.api_key(provider), self._transport)
        return self._clients[provider]

    def close(self) -> None:
        for provider, client in self._clients.items():
            self.adapter(provider).close(client)
        self._clients.clear()

    def chat(self, provider: str, model: str, request: Mapping[str, Any], *,
             cache_key: str | None = None) -> ChatResult:
        """One chat completion call; raises RetryableProviderError or PermanentProviderError.
        `cache_key` is sent as `prompt_cache_key` where the provider's config allows it."""
        settings = self._config.provider(provider)
        key = cache_key if settings.prompt_cache_key else None
        with timed_call(provider, model, Surface.WORKER):
            return adapter_for(settings.kind).chat(self.client(provider), Target(provider, model, settings),
                                                   request, key)

    def chat_for(self, task_type: str, tenant_id: uuid.UUID | str | None
                 ) -> Callable[[str, str, Mapping[str, Any]], ChatResult]:
        """`chat` with the task's `prompt_cache_key`: what `retry.call_with_fallbacks` takes as `call`."""
        return functools.partial(self.chat, cache_key=prompt_cache_key(task_type, tenant_id))


class ProviderBatches:
    """The batch API of one provider, of its kind (`BatchAdapter`); errors mapped like chat errors."""

    def __init__(self, clients: ProviderClients, provider: str) -> None:
        self._api: BatchAdapter = clients.adapter(provider).batches(clients.client(provider), provider,
                                                                    clients.settings(provider))

    def upload_batch_file(self, path: str, filename: str) -> str:
        return self._api.upload_batch_file(path, filename)

    def holds_input_file(self, file_id: str) -> bool:
        """Whether the uploaded input file can still be given to `create_batch` (else: rebuild it)."""
        return self._api.holds_input_file(file_id)

    def create_batch(self, input_file_id: str, metadata: dict[str, str]) -> ProviderBatchInfo:
        return self._api.create_batch(input_file_id, metadata)

    def retrieve_batch(self, batch_id: str) -> ProviderBatchInfo:
        return self._api.retrieve_batch(batch_id)

    def cancel_batch(self, batch_id: str) -> ProviderBatchInfo:
        return self._api.cancel_batch(batch_id)

    def find_batch_by_metadata(self, key: str, value: str, created_after: int, *,
                               request_count: int | None = None) -> ProviderBatchInfo | None:
        """Newest first; stops at batches created before `created_after` (epoch seconds)."""
        return self._api.find_batch_by_metadata(key, value, created_after, request_count=request_count)

    def iter_file_lines(self, file_id: str) -> Iterator[str]:
        """The file's lines, streamed: memory stays flat whatever the file size."""
        return self._api.iter_file_lines(file_id)


# --- OpenAI-compatible front door: async calls for the API process ---------------------------------

class AsyncProviderClients:
    """The API's immediate calls: one pooled async client per provider, of its kind's adapter. The
    OpenAI kind posts the body as given (the gateway has already cut it down to the fields it forwards,
    `tierbatch.gateway.fields`) and keeps the answer as raw bytes, relayed unchanged; other kinds
    translate. `transport` replaces the network (tests: `httpx2.MockTransport`).
    """

    def __init__(self, config: AppConfig, *, transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self._clients: dict[str, Any] = {}

    def client(self, provider: str) -> Any:
        if provider not in self._clients:
            settings = self._config.provider(provider)
            self._clients[provider] = adapter_for(settings.kind).async_client(
                settings, self._config.api_key(provider), self._transport)
        return self._clients[provider]

    async def aclose(self) -> None:
        for provider, client in self._clients.items():
            await adapter_for(self._config.provider(provider).kind).aclose(client)
        self._clients.clear()

    async def chat(self, provider: str, model: str, request: Mapping[str, Any], *,
                   cache_key: str | None = None) -> RawChatAnswer:
        """`cache_key` (see `prompt_cache_key`) is sent where the provider's config allows it."""
        settings = self._config.provider(provider)
        key = cache_key if settings.prompt_cache_key else None
        with timed_call(provider, model, Surface.GATEWAY):
            return await adapter_for(settings.kind).achat(self.client(provider), Target(provider, model, settings),
                                                          request, key)

    async def open_stream(self, provider: str, model: str, request: Mapping[str, Any], *,
                          cache_key: str | None = None) -> ChatStream:
        """Start a streamed call; returns once the provider answered 200 (errors raise before any byte)."""
        settings = self._config.provider(provider)
        key = cache_key if settings.prompt_cache_key else None
        # a stream is timed to its first answer (the 200 and its headers): the rest is the client's pace
        with timed_call(provider, model, Surface.GATEWAY):
            return await adapter_for(settings.kind).open_stream(self.client(provider),
                                                                Target(provider, model, settings), request, key)
