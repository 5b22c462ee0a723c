"""The Anthropic kind on a test transport (tierbatch/providers/anthropic_adapter.py behind
`ProviderClients` and `AsyncProviderClients`): what a call sends, what comes back as a chat completion,
a stream relayed chunk by chunk, errors mapped by type and status, and a chain falling back from an
Anthropic model to an OpenAI-compatible one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from tierbatch.base.config import AppConfig, ImmediateConfig, ModelRef, default_config_data, parse_config
from tierbatch.base.errors import ChainExhausted, PermanentProviderError, RetryableProviderError
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.providers.client import AsyncProviderClients, ProviderClients
from tierbatch.providers.retry import call_with_fallbacks

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
           "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 12, "cache_read_input_tokens": 2048, "cache_creation_input_tokens": 0,
                     "output_tokens": 3}}


def config(**claude: Any) -> AppConfig:
    data = default_config_data()
    data["providers"]["claude"] = {"kind": "anthropic", "base_url": "http://anthropic.test", "batch": False,
                                   **claude}
    return parse_config(data, environ={})


class Provider:
    """The provider behind `httpx2.MockTransport`: keeps each request, answers with `answer`."""

    def __init__(self, answer: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)


def sync_clients(answer: Callable[[httpx2.Request], httpx2.Response], **claude: Any
                 ) -> tuple[ProviderClients, Provider]:
    provider = Provider(answer)
    return ProviderClients(config(**claude), transport=httpx2.MockTransport(provider)), provider


def test_a_worker_call_goes_through_the_messages_api_and_comes_back_a_chat_completion() -> None:
    clients, provider = sync_clients(lambda _: httpx2.Response(200, json=MESSAGE), default_max_tokens=512)
    try:
        result = clients.chat("claude", "claude-haiku-4-5", {"messages": HI, "temperature": 0},
                              cache_key="tierbatch-k")
    finally:
        clients.close()
    [sent] = provider.requests
    assert (sent.method, str(sent.url)) == ("POST", "http://anthropic.test/v1/messages")
    assert sent.headers["authorization"] == "Bearer unused"
    assert sent.headers["anthropic-version"] == ANTHROPIC_API_VERSION
    assert json.loads(sent.content) == {
        "model": "claude-haiku-4-5", "max_tokens": 512,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert (result.provider, result.requested_model, result.served_model, result.output) == (
        "claude", "claude-haiku-4-5", "claude-haiku-4-5-20251001", "hello")
    assert result.usage == TokenUsage(input_tokens=2060, cached_tokens=2048, output_tokens=3)
    assert result.body["choices"][0]["finish_reason"] == "stop"


def test_no_cache_marker_where_the_providers_config_turns_prompt_caching_off() -> None:
    clients, provider = sync_clients(lambda _: httpx2.Response(200, json=MESSAGE), prompt_cache_key=False)
    clients.chat("claude", "claude-haiku-4-5", {"messages": HI}, cache_key="tierbatch-k")
    clients.close()
    assert json.loads(provider.requests[0].content)["system"] == [{"type": "text", "text": "Be brief."}]


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {},
                           json={"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(("response", "retryable", "retry_after"), [
    (_error(429, "rate_limit_error", "slow down", {"retry-after": "7"}), True, 7.0),
    (_error(529, "overloaded_error", "Overloaded"), True, None),
    (_error(500, "api_error", "oops"), True, None),
    (_error(400, "invalid_request_error", "bad"), False, None),
])
def test_worker_errors_are_mapped_by_status_and_type(response: httpx2.Response, retryable: bool,
                                                     retry_after: float | None) -> None:
    clients, provider = sync_clients(lambda _: response)
    with pytest.raises((RetryableProviderError, PermanentProviderError)) as caught:
        clients.chat("claude", "claude-haiku-4-5", {"messages": HI})
    clients.close()
    error = caught.value
    assert isinstance(error, RetryableProviderError) is retryable
    assert (error.status_code, error.provider, error.model) == (response.status_code, "claude", "claude-haiku-4-5")
    assert getattr(error, "retry_after", None) == retry_after
    assert error.message.startswith(f"claude/claude-haiku-4-5: HTTP {response.status_code}: ")
    assert len(provider.requests) == 1  # the SDK does not retry: retries are ours


def test_a_worker_timeout_is_retryable_and_flagged() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("slow", request=request)

    clients, _ = sync_clients(answer)
    with pytest.raises(RetryableProviderError) as caught:
        clients.chat("claude", "claude-haiku-4-5", {"messages": HI})
    clients.close()
    assert caught.value.timed_out


def test_an_untranslatable_request_is_permanent_without_a_call() -> None:
    clients, provider = sync_clients(lambda _: httpx2.Response(200, json=MESSAGE))
    with pytest.raises(PermanentProviderError) as caught:
        clients.chat("claude", "claude-haiku-4-5", {"messages": HI, "n": 3})
    clients.close()
    assert not isinstance(caught.value, RetryableProviderError)
    assert provider.requests == []


def test_a_chain_falls_back_from_an_anthropic_model_to_an_openai_compatible_one() -> None:
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "from openai"},
                               "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}

    def answer(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "anthropic.test":
            return _error(529, "overloaded_error", "Overloaded")
        return httpx2.Response(200, json=completion)

    clients, provider = sync_clients(answer)
    chain = [ModelRef(provider="claude", model="claude-haiku-4-5"), ModelRef(provider="sim", model="gpt-4o-mini")]
    policy = ImmediateConfig(retries_per_model=1)
    try:
        result = call_with_fallbacks(clients.chat_for("classification", None), chain, {"messages": HI}, policy,
                                     lambda _: None)
    finally:
        clients.close()
    assert (result.provider, result.output) == ("sim", "from openai")
    assert [r.url.path for r in provider.requests] == ["/v1/messages", "/v1/messages", "/v1/chat/completions"]
    assert "prompt_cache_key" in json.loads(provider.requests[-1].content)  # the OpenAI kind's own hint

    clients, _ = sync_clients(lambda _: _error(400, "invalid_request_error", "bad"))
    with pytest.raises(ChainExhausted):
        call_with_fallbacks(clients.chat, chain[:1], {"messages": HI}, policy, lambda _: None)
    clients.close()


# --- the gateway's async calls ---------------------------------------------------------------------

def async_clients(handler: Callable[[httpx2.Request], Any]) -> AsyncProviderClients:
    return AsyncProviderClients(config(), transport=httpx2.MockTransport(handler))


def test_a_gateway_call_answers_a_chat_completion_as_bytes() -> None:
    seen: list[httpx2.Request] = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        seen.append(request)
        return httpx2.Response(200, json=MESSAGE)

    async def run() -> Any:
        providers = async_clients(handler)
        try:
            return await providers.chat("claude", "claude-haiku-4-5", {"messages": HI}, cache_key=None)
        finally:
            await providers.aclose()

    answer = asyncio.run(run())
    [sent] = seen
    assert str(sent.url) == "http://anthropic.test/v1/messages"
    # the same API version and key header as the SDK's calls
    assert sent.headers["authorization"] == "Bearer unused"
    assert sent.headers["anthropic-version"] == ANTHROPIC_API_VERSION
    assert json.loads(sent.content)["system"] == [{"type": "text", "text": "Be brief."}]
    assert json.loads(answer.content) == answer.body
    assert answer.served_model == "claude-haiku-4-5-20251001"
    assert answer.body["choices"][0]["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert answer.body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2048, "cache_write_tokens": 0}


def test_gateway_errors_are_mapped_by_status_and_type() -> None:
    async def run(response: httpx2.Response) -> BaseException:
        async def handler(request: httpx2.Request) -> httpx2.Response:
            return response

        providers = async_clients(handler)
        try:
            await providers.open_stream("claude", "claude-haiku-4-5", {"messages": HI})
        except Exception as exc:
            return exc
        finally:
            await providers.aclose()
        raise AssertionError("no error")

    limited = asyncio.run(run(_error(429, "rate_limit_error", "slow", {"retry-after": "3"})))
    assert isinstance(limited, RetryableProviderError) and limited.retry_after == 3.0
    assert limited.message == "claude/claude-haiku-4-5: HTTP 429: slow"
    assert isinstance(asyncio.run(run(_error(529, "overloaded_error", "Overloaded"))), RetryableProviderError)
    refused = asyncio.run(run(_error(400, "invalid_request_error", "bad")))
    assert isinstance(refused, PermanentProviderError) and refused.status_code == 400


class _SlowEvents(httpx2.AsyncByteStream):
    """Anthropic's SSE events; everything after the first text delta waits for `release`."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release

    def _event(self, body: dict[str, Any]) -> bytes:
        return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._event({"type": "message_start", "message": {
            "id": "msg_s", "model": "claude-haiku-4-5-20251001", "usage": {"input_tokens": 9, "output_tokens": 1}}})
        yield self._event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield self._event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})
        await self.release.wait()
        yield self._event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}})
        yield self._event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 4}})
        yield self._event({"type": "message_stop"})


def test_a_stream_is_relayed_chunk_by_chunk_before_the_provider_finishes() -> None:
    async def run() -> tuple[list[str], list[str], dict[str, Any]]:
        release = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def handler(request: httpx2.Request) -> httpx2.Response:
            sent.append(json.loads(await request.aread()))
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=_SlowEvents(release))

        providers = async_clients(handler)
        try:
            stream = await providers.open_stream("claude", "claude-haiku-4-5", {"messages": HI})
            lines = stream.lines()
            early = [await anext(lines), await anext(lines)]  # while the provider is still holding back
            release.set()
            rest = [line async for line in lines]
            await stream.aclose()
        finally:
            await providers.aclose()
        return early, rest, sent[0]

    early, rest, sent = asyncio.run(run())
    assert sent["stream"] is True
    assert [json.loads(line[6:])["choices"][0]["delta"] for line in early] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}]
    *chunks, usage_line, done = rest
    assert [json.loads(line[6:])["choices"][0] for line in chunks] == [
        {"index": 0, "delta": {"content": "!"}, "logprobs": None, "finish_reason": None},
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    usage_chunk = json.loads(usage_line[6:])
    assert usage_chunk["choices"] == [] and usage_chunk["model"] == "claude-haiku-4-5-20251001"
    assert usage_chunk["usage"]["prompt_tokens"] == 9 and usage_chunk["usage"]["completion_tokens"] == 4
    assert done == "data: [DONE]"
