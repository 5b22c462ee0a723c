"""The Anthropic kind: the Messages API behind the OpenAI shape. The only modules that import
`anthropic`, with `tierbatch.providers.anthropic_errors` and `tierbatch.providers.anthropic_batches`
(Message Batches).

The worker calls through the `anthropic` SDK (`anthropic.Anthropic`, `max_retries=0`: retries and
fallbacks are ours); the gateway posts to `v1/messages` on raw `httpx2` (the SDK's own transport), like
the OpenAI kind, so a stream's first event is translated and relayed the moment it arrives. Requests
and answers are translated by `tierbatch.providers.anthropic_messages`, streams by
`tierbatch.providers.anthropic_stream`. `base_url` is the API's root as the SDK takes it (no `/v1`).

Errors by type and status (`tierbatch.providers.error_mapping`): 429, 5xx and 529 `overloaded_error`,
timeouts and broken connections are retryable (`retry-after` kept), other 4xx permanent; a request
with no Anthropic equivalent is permanent too, so the chain moves on to its next model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import anthropic
import httpx2
from anthropic._constants import ANTHROPIC_API_VERSION

from tierbatch.base.config import ProviderConfig
from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.providers.adapter import (
    Capabilities,
    ChatResult,
    ChatStream,
    RawChatAnswer,
    Target,
    output_from_body,
    usage_from_body,
)
from tierbatch.providers.anthropic_batches import AnthropicBatches
from tierbatch.providers.anthropic_errors import OVERLOADED, error_type, map_anthropic_error
from tierbatch.providers.anthropic_messages import Translated, Untranslatable, to_chat_completion, to_messages_params
from tierbatch.providers.anthropic_stream import AnthropicChatStream
from tierbatch.providers.error_mapping import status_error, transport_error

MESSAGES_PATH = "v1/messages"


def translate(target: Target, request: Mapping[str, Any], cache_key: str | None) -> Translated:
    """The request as Messages params, or a permanent error naming what has no equivalent."""
    try:
        return to_messages_params(request, target.model, target.settings.default_max_tokens, cache_key)
    except Untranslatable as exc:
        raise PermanentProviderError(f"{target.provider}/{target.model}: not translatable to Anthropic's "
                                     f"Messages API: {exc}", provider=target.provider, model=target.model) from exc


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _answer(target: Target, content: bytes) -> dict[str, Any]:
    try:
        message = json.loads(content, parse_constant=_not_json)
    except ValueError as exc:
        raise RetryableProviderError(f"{target.provider}/{target.model}: the answer is not JSON",
                                     provider=target.provider, model=target.model) from exc
    if not isinstance(message, dict):
        raise RetryableProviderError(f"{target.provider}/{target.model}: the answer is not a JSON object",
                                     provider=target.provider, model=target.model)
    return message


class AnthropicAdapter:
    kind = "anthropic"
    capabilities = Capabilities(batch=True, tools=True, json_schema=True, prompt_caching=True)

    def sync_client(self, settings: ProviderConfig, api_key: str,
                    transport: httpx2.BaseTransport | None) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=settings.base_url,
            api_key=api_key,
            max_retries=0,  # retries and fallbacks are ours (tierbatch.providers.retry), not the SDK's
            timeout=settings.timeout_seconds,
            http_client=anthropic.DefaultHttpxClient(transport=transport) if transport is not None else None,
        )

    def close(self, client: anthropic.Anthropic) -> None:
        client.close()

    def map_error(self, exc: Exception, provider: str, model: str) -> ProviderError | None:
        if isinstance(exc, anthropic.AnthropicError):
            return map_anthropic_error(exc, provider, model)
        if isinstance(exc, httpx2.HTTPError):
            return transport_error(exc, provider, model)
        return None

    def chat(self, client: anthropic.Anthropic, target: Target, request: Mapping[str, Any],
             cache_key: str | None) -> ChatResult:
        translated = translate(target, request, cache_key)
        started = time.perf_counter()
        try:
            message = client.messages.create(**translated.params)
        except anthropic.AnthropicError as exc:
            raise map_anthropic_error(exc, target.provider, target.model) from exc
        latency_ms = int((time.perf_counter() - started) * 1000)
        body = to_chat_completion(message.model_dump(mode="json"), translated.response_tool)
        return ChatResult(provider=target.provider, requested_model=target.model,
                          served_model=str(body.get("model") or target.model), body=body,
                          output=output_from_body(body), usage=usage_from_body(body), latency_ms=latency_ms)

    def batches(self, client: anthropic.Anthropic, provider: str, settings: ProviderConfig) -> AnthropicBatches:
        return AnthropicBatches(client, provider, settings.default_max_tokens)

    def async_client(self, settings: ProviderConfig, api_key: str,
                     transport: httpx2.AsyncBaseTransport | None) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            # as the SDK sends them (its API version, its key header), so both paths speak one API version
            headers={"Authorization": f"Bearer {api_key}", "anthropic-version": ANTHROPIC_API_VERSION,
                     "Content-Type": "application/json", "Accept": "application/json"},
            timeout=settings.timeout_seconds,
            limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )

    async def aclose(self, client: httpx2.AsyncClient) -> None:
        await client.aclose()

    async def achat(self, client: httpx2.AsyncClient, target: Target, request: Mapping[str, Any],
                    cache_key: str | None) -> RawChatAnswer:
        translated = translate(target, request, cache_key)
        started = time.perf_counter()
        payload = json.dumps(translated.params, ensure_ascii=False).encode()
        try:
            response = await client.post(MESSAGES_PATH, content=payload)
        except httpx2.HTTPError as exc:
            raise transport_error(exc, target.provider, target.model) from exc
        if response.status_code >= 400:
            raise self._status_error(response, target)
        body = to_chat_completion(_answer(target, response.content), translated.response_tool)
        content = json.dumps(body, ensure_ascii=False).encode()
        return RawChatAnswer(target.provider, target.model, content, body,
                             int((time.perf_counter() - started) * 1000))

    async def open_stream(self, client: httpx2.AsyncClient, target: Target, request: Mapping[str, Any],
                          cache_key: str | None) -> ChatStream:
        translated = translate(target, request, cache_key)
        payload = json.dumps({**translated.params, "stream": True}, ensure_ascii=False).encode()
        try:
            response = await client.send(client.build_request("POST", MESSAGES_PATH, content=payload,
                                                              headers={"Accept": "text/event-stream"}),
                                         stream=True)
        except httpx2.HTTPError as exc:
            raise transport_error(exc, target.provider, target.model) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx2.HTTPError as exc:
                raise transport_error(exc, target.provider, target.model) from exc
            finally:
                await response.aclose()
            raise self._status_error(response, target)
        return AnthropicChatStream(target.provider, target.model, response, translated.response_tool)

    @staticmethod
    def _status_error(response: httpx2.Response, target: Target) -> ProviderError:
        try:
            overloaded = error_type(json.loads(response.content)) == OVERLOADED
        except ValueError:
            overloaded = False
        return status_error(response.status_code, response.headers, response.content, target.provider,
                            target.model, retryable=overloaded)
