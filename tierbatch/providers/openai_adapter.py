"""The OpenAI kind: OpenAI's own wire format, which every OpenAI-compatible server speaks too (the
simulator, vLLM, Ollama, ...). The only module that imports `openai`.

`openai.*` errors are mapped here, by type, to tierbatch.base.errors; nothing outside sees them.
Requests go out as given (with OpenAI's `prompt_cache_key`, `tierbatch.providers.cache_keys`), answers
come back as they are: the gateway relays their bytes unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx2
import openai
import orjson

from tierbatch.base.config import ProviderConfig
from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.providers.adapter import (
    Capabilities,
    ChatResult,
    ChatStream,
    ProviderBatchInfo,
    RawChatAnswer,
    Target,
    output_from_body,
    usage_from_body,
)
from tierbatch.providers.cache_keys import PROMPT_CACHE_KEY_FIELD, with_prompt_cache_key
from tierbatch.providers.error_mapping import classified, error_message, error_text, status_error, transport_error
from tierbatch.providers.http1 import ConnectionFailed, Http1Pool, proxy_configured


def _message_of(exc: openai.APIStatusError) -> str:
    """Worded like `status_error` words the same answer (the SDK's own message repeats a body's text)."""
    return error_message(exc.body) or error_text(exc.response.content, exc.response.headers.get("content-type"))


def map_openai_error(exc: openai.OpenAIError, provider: str, model: str) -> ProviderError:
    """Classify an openai SDK error by its type and status code, never by its text."""
    if isinstance(exc, openai.APITimeoutError):
        return RetryableProviderError(f"{provider}/{model}: request timed out", provider=provider, model=model,
                                      timed_out=True)
    if isinstance(exc, openai.APIConnectionError):
        return RetryableProviderError(f"{provider}/{model}: connection failed: {exc}", provider=provider,
                                      model=model)
    if isinstance(exc, openai.APIStatusError):
        return classified(exc.status_code, _message_of(exc), exc.response.headers, provider, model)
    return PermanentProviderError(f"{provider}/{model}: {type(exc).__name__}: {exc}", provider=provider,
                                  model=model)


def _batch_info(batch: Any) -> ProviderBatchInfo:
    errors = []
    if batch.errors is not None and batch.errors.data:
        errors = [e.model_dump(mode="json", exclude_none=True) for e in batch.errors.data]
    return ProviderBatchInfo(id=batch.id, status=batch.status, output_file_id=batch.output_file_id,
                             error_file_id=batch.error_file_id, errors=errors,
                             metadata=dict(batch.metadata or {}), created_at=int(batch.created_at))


class OpenAIBatches:
    """Files and Batch API calls of one provider; openai errors mapped like chat errors."""

    def __init__(self, client: openai.OpenAI, provider: str) -> None:
        self._client = client
        self._provider = provider

    def _mapped(self, exc: openai.OpenAIError) -> ProviderError:
        return map_openai_error(exc, self._provider, "batch")

    def upload_batch_file(self, path: str, filename: str) -> str:
        try:
            with open(path, "rb") as handle:
                return self._client.files.create(file=(filename, handle), purpose="batch").id
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc

    def holds_input_file(self, file_id: str) -> bool:
        return True  # uploaded files live at the provider

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

    def cancel_batch(self, batch_id: str) -> ProviderBatchInfo:
        try:
            return _batch_info(self._client.batches.cancel(batch_id))
        except openai.OpenAIError as exc:
            raise self._mapped(exc) from exc

    def find_batch_by_metadata(self, key: str, value: str, created_after: int, *,
                               request_count: int | None = None) -> ProviderBatchInfo | None:
        """Newest first; stops at batches created before `created_after` (epoch seconds). Batches carry
        their metadata: `request_count` is not needed."""
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


class Http1ChatStream:
    """An open streamed chat completion over the lean client (status 200 already received)."""

    def __init__(self, provider: str, model: str, stream: Any) -> None:
        self.provider = provider
        self.requested_model = model
        self._stream = stream

    async def lines(self) -> AsyncIterator[str]:
        try:
            async for line in self._stream.lines():
                yield line
        except (ConnectionFailed, TimeoutError) as exc:
            raise _lean_error(exc, self.provider, self.requested_model, "stream broken: ") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


def _lean_error(exc: Exception, provider: str, model: str, what: str = "") -> RetryableProviderError:
    """The lean client's errors, worded like `transport_error` words `httpx2`'s."""
    if isinstance(exc, TimeoutError):
        return RetryableProviderError(f"{provider}/{model}: {what}request timed out", provider=provider,
                                      model=model, timed_out=True)
    return RetryableProviderError(f"{provider}/{model}: {what}connection failed: {exc}", provider=provider,
                                  model=model)


_ACCEPT_JSON = (("Accept", "application/json"),)
_ACCEPT_STREAM = (("Accept", "text/event-stream"),)


class SSEChatStream:
    """An open streamed chat completion (status 200 already received): its SSE lines as they arrive."""

    def __init__(self, provider: str, model: str, response: httpx2.Response) -> None:
        self.provider = provider
        self.requested_model = model
        self._response = response

    async def lines(self) -> AsyncIterator[str]:
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


def _payload(body: Mapping[str, Any]) -> bytes:
    """The request's JSON: orjson, or the standard library for what orjson refuses (an integer over 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False).encode()


def _answer_body(content: bytes) -> Any:
    """The answer parsed: orjson (which refuses NaN and Infinity, as it should: Postgres could not record
    them), else the standard library, which also takes an escaped unpaired surrogate (recorded replaced)
    but not NaN/Infinity either; ValueError when it is not JSON."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content, parse_constant=_not_json)


def _cache_key_field(request: Mapping[str, Any], cache_key: str | None) -> dict[str, str]:
    if cache_key is None or PROMPT_CACHE_KEY_FIELD in request:
        return {}
    return {PROMPT_CACHE_KEY_FIELD: cache_key}


class OpenAIAdapter:
    """The worker's calls through the `openai` SDK; the gateway's on raw `httpx2` (the SDK's own
    transport), posting the body as given and keeping the answer as raw bytes. No typed models on the
    gateway's hot path (the SDK's request machinery costs about a third of a millisecond a call). Error
    statuses of the raw calls are classified by `status_error`, by status code, with the same rule as
    `map_openai_error` for the worker's calls."""

    kind = "openai"
    capabilities = Capabilities(batch=True, tools=True, json_schema=True, prompt_caching=True)

    def sync_client(self, settings: ProviderConfig, api_key: str,
                    transport: httpx2.BaseTransport | None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=settings.base_url,
            api_key=api_key,
            max_retries=0,  # retries and fallbacks are ours (tierbatch.providers.retry), not the SDK's
            timeout=settings.timeout_seconds,
            # the SDK's own client class keeps its defaults (connection limits, redirects)
            http_client=openai.DefaultHttpxClient(transport=transport) if transport is not None else None,
        )

    def close(self, client: openai.OpenAI) -> None:
        client.close()

    def map_error(self, exc: Exception, provider: str, model: str) -> ProviderError | None:
        if isinstance(exc, openai.OpenAIError):
            return map_openai_error(exc, provider, model)
        if isinstance(exc, httpx2.HTTPError):
            return transport_error(exc, provider, model)
        return None

    def chat(self, client: openai.OpenAI, target: Target, request: Mapping[str, Any],
             cache_key: str | None) -> ChatResult:
        provider, model = target.provider, target.model
        request = with_prompt_cache_key(request, cache_key)
        started = time.perf_counter()
        try:
            completion = client.chat.completions.create(model=model, **request)
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

    def batches(self, client: openai.OpenAI, provider: str, settings: ProviderConfig) -> OpenAIBatches:
        return OpenAIBatches(client, provider)

    def async_client(self, settings: ProviderConfig, api_key: str,
                     transport: httpx2.AsyncBaseTransport | None) -> httpx2.AsyncClient | Http1Pool:
        """The lean keep-alive pool (`tierbatch.providers.http1`); `httpx2` when a transport replaces the
        network (tests) or the environment names a proxy (which only `httpx2` honours)."""
        if transport is None and not proxy_configured():
            return Http1Pool(settings.base_url, (("Authorization", f"Bearer {api_key}"),
                                                 ("Content-Type", "application/json")),
                             settings.timeout_seconds)
        return httpx2.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key}",
                     "Content-Type": "application/json", "Accept": "application/json"},
            timeout=settings.timeout_seconds,
            limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )

    async def aclose(self, client: httpx2.AsyncClient | Http1Pool) -> None:
        await client.aclose()

    async def achat(self, client: httpx2.AsyncClient | Http1Pool, target: Target, request: Mapping[str, Any],
                    cache_key: str | None) -> RawChatAnswer:
        provider, model = target.provider, target.model
        started = time.perf_counter()
        payload = _payload({**request, **_cache_key_field(request, cache_key), "model": model})
        response: httpx2.Response | Any
        if isinstance(client, Http1Pool):
            try:
                response = await client.request("chat/completions", payload, _ACCEPT_JSON)
            except (ConnectionFailed, TimeoutError) as exc:
                raise _lean_error(exc, provider, model) from exc
        else:
            try:
                response = await client.post("chat/completions", content=payload)
            except httpx2.HTTPError as exc:
                raise transport_error(exc, provider, model) from exc
        if response.status_code >= 400:
            raise status_error(response.status_code, response.headers, response.content, provider, model)
        content = response.content
        try:
            body = _answer_body(content)
        except ValueError as exc:
            raise RetryableProviderError(f"{provider}/{model}: the answer is not JSON", provider=provider,
                                         model=model) from exc
        if not isinstance(body, dict):
            raise RetryableProviderError(f"{provider}/{model}: the answer is not a JSON object",
                                         provider=provider, model=model)
        return RawChatAnswer(provider, model, content, body, int((time.perf_counter() - started) * 1000))

    async def open_stream(self, client: httpx2.AsyncClient | Http1Pool, target: Target, request: Mapping[str, Any],
                          cache_key: str | None) -> ChatStream:
        provider, model = target.provider, target.model
        payload = _payload({**request, **_cache_key_field(request, cache_key), "model": model, "stream": True})
        if isinstance(client, Http1Pool):
            return await self._open_lean_stream(client, provider, model, payload)
        try:
            response = await client.send(client.build_request("POST", "chat/completions", content=payload,
                                                              headers={"Accept": "text/event-stream"}),
                                         stream=True)
        except httpx2.HTTPError as exc:
            raise transport_error(exc, provider, model) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx2.HTTPError as exc:
                raise transport_error(exc, provider, model) from exc
            finally:
                await response.aclose()
            raise status_error(response.status_code, response.headers, response.content, provider, model)
        return SSEChatStream(provider, model, response)

    async def _open_lean_stream(self, client: Http1Pool, provider: str, model: str, payload: bytes) -> ChatStream:
        try:
            stream = await client.stream("chat/completions", payload, _ACCEPT_STREAM)
        except (ConnectionFailed, TimeoutError) as exc:
            raise _lean_error(exc, provider, model) from exc
        if stream.status_code >= 400:
            try:
                content = await stream.read()
            except (ConnectionFailed, TimeoutError) as exc:
                raise _lean_error(exc, provider, model) from exc
            finally:
                await stream.aclose()
            raise status_error(stream.status_code, stream.headers, content, provider, model)
        return Http1ChatStream(provider, model, stream)
