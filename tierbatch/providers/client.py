"""The provider client: the only module that imports `openai`.

`openai.*` errors are mapped here, by type, to tierbatch.base.errors; nothing outside sees them.

Prompt caching: providers cache a request's longest previously seen prefix of 1,024+
tokens and bill it at the cached-input rate. Our requests keep that prefix stable: a job's request is
its system prompt, then the rendered template with the item's text last (`tierbatch.jobs.rows.RequestEncoder`),
and params come after the messages. Where the provider config allows it (`prompt_cache_key`, on by
default), calls also carry OpenAI's `prompt_cache_key` (`prompt_cache_key()` below), which steers
requests with the same prefix to the same cache; it never changes what is answered or billed.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.ledger.pricing import TokenUsage

RETRYABLE_STATUS = frozenset({408, 409, 429})

PROMPT_CACHE_KEY_FIELD = "prompt_cache_key"
PROMPT_CACHE_KEY_PREFIX = "tierbatch-"
_MAX_KEY_TASK_TYPE = 40  # "tierbatch-" + 40 + "-" + 8 hex = 59, under OpenAI's 64-character limit
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@functools.lru_cache(maxsize=4096)
def prompt_cache_key(task_type: str, tenant_id: uuid.UUID | str | None = None) -> str:
    """OpenAI's `prompt_cache_key` for a task: `tierbatch-<task type>-<tenant hash>`.

    Per task type, because the task types of a tenant are what share a system prompt and template.
    Per tenant too (the first 8 hex digits of a SHA-256 of the tenant id, never the id itself): all
    tenants call the provider under one organization, and one key over many tenants' different
    prefixes would crowd a single cache route (OpenAI moves a prefix-and-key pair to more machines
    beyond roughly 15 requests a minute), while tenants' distinct prompts never share a cache entry
    anyway; it also keeps one tenant's requests off the cache routes of another's. It is a routing
    hint, not an isolation guarantee: identical prefixes may still hit the provider's cache across
    keys. Task types that are long or not plain ASCII words are shortened and tagged with a hash.
    """
    name = _KEY_UNSAFE.sub("_", task_type)
    if len(name) > _MAX_KEY_TASK_TYPE or name != task_type:
        digest = hashlib.sha256(task_type.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[:_MAX_KEY_TASK_TYPE - 9]}~{digest}"
    if tenant_id is None:
        return PROMPT_CACHE_KEY_PREFIX + name
    tenant = hashlib.sha256(str(tenant_id).encode()).hexdigest()[:8]
    return f"{PROMPT_CACHE_KEY_PREFIX}{name}-{tenant}"


def with_prompt_cache_key(request: Mapping[str, Any], key: str | None) -> Mapping[str, Any]:
    """The request with `prompt_cache_key` added, unless there is no key or the request has its own."""
    if key is None or PROMPT_CACHE_KEY_FIELD in request:
        return request
    return {**request, PROMPT_CACHE_KEY_FIELD: key}


@dataclass(frozen=True, slots=True)
class ChatResult:
    provider: str
    requested_model: str
    served_model: str
    body: dict[str, Any]
    output: str
    usage: TokenUsage
    latency_ms: int


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


def _message_of(exc: openai.APIStatusError) -> str:
    """Worded like `status_error` words the same answer (the SDK's own message repeats a body's text)."""
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return _error_text(exc.response.content, exc.response.headers.get("content-type"))


def _error_text(content: bytes, content_type: str | None) -> str:
    """OpenAI's `error.message` of an error body. A body without one (plain text, an HTML page, a server's
    traceback) is not repeated: it may hold internals, and the message reaches clients (task errors, the
    gateway's error bodies). It is said what came instead; operators see the body in the server's log."""
    text = content.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    if not text:
        return "the provider answered with an empty body"
    kind = (content_type or "").split(";")[0].strip() or "no content type"
    shape = "a JSON body without an error message" if body is not None else "a body that is not JSON"
    return f"the provider answered with {shape} ({kind}, {len(content)} bytes)"


def status_error(status: int, headers: Mapping[str, str], content: bytes, provider: str, model: str
                 ) -> ProviderError:
    """A provider's error answer, classified by its status code like `map_openai_error` does."""
    return _classified(status, _error_text(content, headers.get("content-type")), headers, provider, model)


def _classified(status: int, message: str, headers: Mapping[str, str], provider: str, model: str
                ) -> ProviderError:
    """408/409/429 and 5xx are worth retrying (with the provider's `retry-after`); other 4xx are not."""
    text = f"{provider}/{model}: HTTP {status}: {message}"
    if status in RETRYABLE_STATUS or status >= 500:
        return RetryableProviderError(text, status_code=status, provider=provider, model=model,
                                      retry_after=parse_retry_after(headers))
    return PermanentProviderError(text, status_code=status, provider=provider, model=model)


def map_openai_error(exc: openai.OpenAIError, provider: str, model: str) -> ProviderError:
    """Classify an openai SDK error by its type and status code, never by its text."""
    if isinstance(exc, openai.APITimeoutError):
        return RetryableProviderError(f"{provider}/{model}: request timed out", provider=provider, model=model,
                                      timed_out=True)
    if isinstance(exc, openai.APIConnectionError):
        return RetryableProviderError(f"{provider}/{model}: connection failed: {exc}", provider=provider,
                                      model=model)
    if isinstance(exc, openai.APIStatusError):
        return _classified(exc.status_code, _message_of(exc), exc.response.headers, provider, model)
    return PermanentProviderError(f"{provider}/{model}: {type(exc).__name__}: {exc}", provider=provider,
                                  model=model)


class ProviderClients:
    """One `openai.OpenAI` client per configured provider, created on first use.
    `transport` replaces the network (tests: `httpx2.MockTransport`); without it the SDK makes its own
    HTTP client."""

    def __init__(self, config: AppConfig, *, transport: httpx2.BaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self._clients: dict[str, openai.OpenAI] = {}

    def client(self, provider: str) -> openai.OpenAI:
        if provider not in self._clients:
            provider_config = self._config.provider(provider)
            self._clients[provider] = openai.OpenAI(
                base_url=provider_config.base_url,
                api_key=self._config.api_key(provider),
                max_retries=0,  # retries and fallbacks are ours (tierbatch.providers.retry), not the SDK's
                timeout=provider_config.timeout_seconds,
                # the SDK's own client class keeps its defaults (connection limits, redirects)
                http_client=(openai.DefaultHttpxClient(transport=self._transport)
                             if self._transport is not None else None),
            )
        return self._clients[provider]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def chat(self, provider: str, model: str, request: Mapping[str, Any], *,
             cache_key: str | None = None) -> ChatResult:
        """One chat completion call; raises RetryableProviderError or PermanentProviderError.
        `cache_key` is sent as `prompt_cache_key` where the provider's config allows it."""
        if cache_key is not None and self._config.provider(provider).prompt_cache_key:
            request = with_prompt_cache_key(request, cache_key)
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

    def chat_for(self, task_type: str, tenant_id: uuid.UUID | str | None
                 ) -> Callable[[str, str, Mapping[str, Any]], ChatResult]:
        """`chat` with the task's `prompt_cache_key`: what `retry.call_with_fallbacks` takes as `call`."""
        return functools.partial(self.chat, cache_key=prompt_cache_key(task_type, tenant_id))


@dataclass(frozen=True, slots=True)
class ProviderBatchInfo:
    id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]]
    metadata: dict[str, str]
    created_at: int


def _batch_info(batch: Any) -> ProviderBatchInfo:
    errors = []
    if batch.errors is not None and batch.errors.data:
        errors = [e.model_dump(mode="json", exclude_none=True) for e in batch.errors.data]
    return ProviderBatchInfo(id=batch.id, status=batch.status, output_file_id=batch.output_file_id,
                             error_file_id=batch.error_file_id, errors=errors,
                             metadata=dict(batch.metadata or {}), created_at=int(batch.created_at))


class ProviderBatches:
    """Files and Batch API calls of one provider; openai errors mapped like chat errors."""

    def __init__(self, clients: ProviderClients, provider: str) -> None:
        self._client = clients.client(provider)
        self._provider = provider

    def _mapped(self, exc: openai.OpenAIError) -> ProviderError:
        return map_openai_error(exc, self._provider, "batch")

    def upload_batch_file(self, path: str, filename: str) -> str:
        try:
            with open(path, "rb") as handle:
                return self._client.files.create(file=(filename, handle), purpose="batch").id
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc

    def create_batch(self, input_file_id: str, metadata: dict[str, str]) -> ProviderBatchInfo:
        try:
            batch = self._client.batches.create(input_file_id=input_file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h", metadata=metadata)
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc
        return _batch_info(batch)

    def retrieve_batch(self, batch_id: str) -> ProviderBatchInfo:
        try:
            return _batch_info(self._client.batches.retrieve(batch_id))
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc

    def find_batch_by_metadata(self, key: str, value: str, created_after: int) -> ProviderBatchInfo | None:
        """Newest first; stops at batches created before `created_after` (epoch seconds)."""
        try:
            for batch in self._client.batches.list(limit=100):
                if int(batch.created_at) < created_after:
                    return None
                if (batch.metadata or {}).get(key) == value:
                    return _batch_info(batch)
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc
        return None

    def iter_file_lines(self, file_id: str) -> Iterator[str]:
        """The file's lines, streamed: memory stays flat whatever the file size."""
        try:
            with self._client.files.with_streaming_response.content(file_id) as response:
                for line in response.iter_lines():
                    if line:
                        yield line
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc


# --- OpenAI-compatible front door: async calls for the API process ---------------------------------

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


class ChatStream:
    """An open streamed chat completion (status 200 already received): its SSE lines as they arrive."""

    def __init__(self, provider: str, model: str, response: httpx2.Response) -> None:
        self.provider = provider
        self.requested_model = model
        self._response = response

    async def lines(self) -> Any:
        """Async iterator over the raw SSE lines; a broken connection raises ProviderError."""
        try:
            async for line in self._response.aiter_lines():
                yield line
        except (httpx2.HTTPError, openai.OpenAIError) as exc:
            raise RetryableProviderError(f"{self.provider}/{self.requested_model}: stream broken: "
                                         f"{type(exc).__name__}: {exc}", provider=self.provider,
                                         model=self.requested_model) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


class AsyncProviderClients:
    """The API's immediate calls: one pooled async HTTP client per provider, on the SDK's own transport
    (`httpx2`), posting the body as given (the gateway has already cut it down to the fields it forwards,
    `tierbatch.gateway.fields`) and keeping the answer as raw bytes. No typed models on the hot path (the SDK's
    request machinery costs about a third of a millisecond a call). Error statuses are classified by
    `status_error`, by status code, with the same rule as `map_openai_error` for the worker's calls.
    `transport` replaces the network (tests: `httpx2.MockTransport`).
    """

    def __init__(self, config: AppConfig, *, transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self._http: dict[str, httpx2.AsyncClient] = {}

    def http(self, provider: str) -> httpx2.AsyncClient:
        if provider not in self._http:
            provider_config = self._config.provider(provider)
            self._http[provider] = httpx2.AsyncClient(
                base_url=provider_config.base_url.rstrip("/") + "/",
                headers={"Authorization": f"Bearer {self._config.api_key(provider)}",
                         "Content-Type": "application/json", "Accept": "application/json"},
                timeout=provider_config.timeout_seconds,
                limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
                transport=self._transport,
            )
        return self._http[provider]

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()
        self._http.clear()

    @staticmethod
    def _status_error(response: httpx2.Response, provider: str, model: str) -> ProviderError:
        return status_error(response.status_code, response.headers, response.content, provider, model)

    @staticmethod
    def _transport_error(exc: Exception, provider: str, model: str) -> ProviderError:
        if isinstance(exc, httpx2.TimeoutException):
            return RetryableProviderError(f"{provider}/{model}: request timed out", provider=provider,
                                          model=model, timed_out=True)
        return RetryableProviderError(f"{provider}/{model}: connection failed: {type(exc).__name__}: {exc}",
                                      provider=provider, model=model)

    def _cache_key_field(self, provider: str, request: Mapping[str, Any], cache_key: str | None) -> dict[str, str]:
        if cache_key is None or PROMPT_CACHE_KEY_FIELD in request or not self._config.provider(
                provider).prompt_cache_key:
            return {}
        return {PROMPT_CACHE_KEY_FIELD: cache_key}

    async def chat(self, provider: str, model: str, request: Mapping[str, Any], *,
                   cache_key: str | None = None) -> RawChatAnswer:
        """`cache_key` (see `prompt_cache_key`) is sent where the provider's config allows it."""
        started = time.perf_counter()
        payload = json.dumps({**request, **self._cache_key_field(provider, request, cache_key), "model": model},
                             ensure_ascii=False).encode()
        try:
            response = await self.http(provider).post("chat/completions", content=payload)
        except httpx2.HTTPError as exc:
            raise self._transport_error(exc, provider, model) from exc
        if response.status_code >= 400:
            raise self._status_error(response, provider, model)
        content = response.content
        try:
            # NaN/Infinity are not JSON (Python's parser takes them; Postgres could not record the answer)
            body = json.loads(content, parse_constant=_not_json)
        except ValueError as exc:
            raise RetryableProviderError(f"{provider}/{model}: the answer is not JSON", provider=provider,
                                         model=model) from exc
        if not isinstance(body, dict):
            raise RetryableProviderError(f"{provider}/{model}: the answer is not a JSON object",
                                         provider=provider, model=model)
        return RawChatAnswer(provider, model, content, body, int((time.perf_counter() - started) * 1000))

    async def open_stream(self, provider: str, model: str, request: Mapping[str, Any], *,
                          cache_key: str | None = None) -> ChatStream:
        """Start a streamed call; returns once the provider answered 200 (errors raise before any byte)."""
        payload = json.dumps({**request, **self._cache_key_field(provider, request, cache_key), "model": model,
                              "stream": True}, ensure_ascii=False).encode()
        http = self.http(provider)
        try:
            response = await http.send(http.build_request("POST", "chat/completions", content=payload,
                                                          headers={"Accept": "text/event-stream"}), stream=True)
        except httpx2.HTTPError as exc:
            raise self._transport_error(exc, provider, model) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx2.HTTPError as exc:
                raise self._transport_error(exc, provider, model) from exc
            finally:
                await response.aclose()
            raise self._status_error(response, provider, model)
        return ChatStream(provider, model, response)
