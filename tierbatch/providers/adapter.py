"""The interface a provider kind implements, and the OpenAI-shaped values every kind hands back.

Everything above the providers package (routing, batching, the gateway, the ledger) speaks OpenAI's
chat completion shape: requests in it, answer bodies in it, stream chunks in it, batch output lines in
it. A kind (`ProviderConfig.kind`) is one `ProviderAdapter`: it translates to and from its provider's
wire format, maps its errors to `tierbatch.base.errors` by type and status (never by text), and reports
usage in the OpenAI body's `usage`, with cache writes in `prompt_tokens_details.cache_write_tokens`,
so `usage_from_body` gives our token kinds for every kind alike.

An adapter is stateless: the connection objects it makes (`sync_client`, `async_client`) are kept,
one per configured provider, by the dispatchers in `tierbatch.providers.client`, which hand them back
to each call. To add a kind: a module with a class implementing `ProviderAdapter`, a case in
`tierbatch.providers.client.adapter_for`, and the name in `tierbatch.base.config.ProviderKind`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx2

from tierbatch.base.config import ProviderConfig
from tierbatch.base.errors import ProviderError
from tierbatch.ledger.pricing import TokenUsage


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a kind can do behind the OpenAI shape."""

    batch: bool  # a batch API behind `BatchAdapter`
    tools: bool  # `tools` / `tool_choice` and tool results
    json_schema: bool  # `response_format` of type `json_schema`
    prompt_caching: bool  # the provider caches prompt prefixes (and the kind steers it with `cache_key`)


@dataclass(frozen=True, slots=True)
class Target:
    """Which provider and model a call goes to, with the provider's config."""

    provider: str
    model: str
    settings: ProviderConfig


@dataclass(frozen=True, slots=True)
class ChatResult:
    provider: str
    requested_model: str
    served_model: str
    body: dict[str, Any]
    output: str
    usage: TokenUsage
    latency_ms: int


@dataclass(frozen=True, slots=True)
class RawChatAnswer:
    """A provider's successful chat completion, as bytes (relayed unchanged) and parsed."""

    provider: str
    requested_model: str
    content: bytes
    body: dict[str, Any]
    latency_ms: int

    @property
    def served_model(self) -> str:
        return str(self.body.get("model") or self.requested_model)


class ChatStream(Protocol):
    """An open streamed chat completion (status 200 already received): OpenAI chunk SSE lines as they
    arrive (`data: {...}` lines ending with `data: [DONE]`)."""

    provider: str
    requested_model: str

    def lines(self) -> AsyncIterator[str]:
        """The SSE lines, without their line ends; a broken connection raises ProviderError."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProviderBatchInfo:
    id: str
    status: str  # OpenAI's batch statuses (`tierbatch.base.states.ProviderBatchStatus`)
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]]
    metadata: dict[str, str]
    created_at: int


class BatchAdapter(Protocol):
    """One provider's batch API, in OpenAI's terms: an input file of chat completion lines in, output
    and error files of `{"custom_id", "response": {"status_code", "body"}, "error"}` lines out."""

    def upload_batch_file(self, path: str, filename: str) -> str:
        """The input file (JSONL of OpenAI batch lines) made available to `create_batch`; its id."""
        ...

    def holds_input_file(self, file_id: str) -> bool:
        """Whether an uploaded input file can still be given to `create_batch` (a kind that keeps the
        requests itself, not at the provider, loses them with its process: the file is then rebuilt)."""
        ...

    def create_batch(self, input_file_id: str, metadata: dict[str, str]) -> ProviderBatchInfo: ...

    def retrieve_batch(self, batch_id: str) -> ProviderBatchInfo: ...

    def cancel_batch(self, batch_id: str) -> ProviderBatchInfo: ...

    def find_batch_by_metadata(self, key: str, value: str, created_after: int, *,
                               request_count: int | None = None) -> ProviderBatchInfo | None:
        """The batch created with `metadata[key] == value` (after a crash between create and store);
        looks at batches created from `created_after` (epoch seconds) on. `request_count` (the lines of
        the input file) may narrow the search; a kind that cannot tell yet raises RetryableProviderError."""
        ...

    def iter_file_lines(self, file_id: str) -> Iterator[str]:
        """The output or error file's lines in OpenAI's batch output shape, streamed."""
        ...


SyncClientT = TypeVar("SyncClientT")
AsyncClientT = TypeVar("AsyncClientT")


class ProviderAdapter(Protocol[SyncClientT, AsyncClientT]):
    """One provider kind. Requests are OpenAI chat completion bodies without `model` (the gateway has
    cut them down to the fields it forwards, `tierbatch.gateway.fields`); `cache_key` is the task's
    `prompt_cache_key`, given only where the provider's config allows it."""

    kind: str
    capabilities: Capabilities

    # the worker: sync calls and the batch API
    def sync_client(self, settings: ProviderConfig, api_key: str,
                    transport: httpx2.BaseTransport | None) -> SyncClientT: ...

    def close(self, client: SyncClientT) -> None: ...

    def chat(self, client: SyncClientT, target: Target, request: Mapping[str, Any],
             cache_key: str | None) -> ChatResult:
        """One chat completion; raises RetryableProviderError or PermanentProviderError."""
        ...

    def batches(self, client: SyncClientT, provider: str, settings: ProviderConfig) -> BatchAdapter: ...

    def map_error(self, exc: Exception, provider: str, model: str) -> ProviderError | None:
        """The SDK's or transport's error as ours, by type and status; None for anything else."""
        ...

    # the gateway: async calls on the API's hot path
    def async_client(self, settings: ProviderConfig, api_key: str,
                     transport: httpx2.AsyncBaseTransport | None) -> AsyncClientT: ...

    async def aclose(self, client: AsyncClientT) -> None: ...

    async def achat(self, client: AsyncClientT, target: Target, request: Mapping[str, Any],
                    cache_key: str | None) -> RawChatAnswer: ...

    async def open_stream(self, client: AsyncClientT, target: Target, request: Mapping[str, Any],
                          cache_key: str | None) -> ChatStream:
        """Start a streamed call; returns once the provider answered 200 (errors raise before any byte)."""
        ...


# where a chat completion body carries cache writes: OpenAI has no such field; the Anthropic adapter
# puts Anthropic's `cache_creation_input_tokens` here when it translates an answer
CACHE_WRITE_FIELD = "cache_write_tokens"


def usage_from_body(body: Mapping[str, Any]) -> TokenUsage:
    usage = body.get("usage") or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    input_tokens = int(usage.get("prompt_tokens") or 0)
    cached = min(int(prompt_details.get("cached_tokens") or 0), input_tokens)
    return TokenUsage(
        input_tokens=input_tokens,
        cached_tokens=cached,
        output_tokens=int(usage.get("completion_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        cache_write_tokens=min(int(prompt_details.get(CACHE_WRITE_FIELD) or 0), input_tokens - cached),
    )


def output_from_body(body: Mapping[str, Any]) -> str:
    choices = body.get("choices") or []
    if not choices:
        return ""
    message = choices[0].get("message") or {}
    return str(message.get("content") or "")
