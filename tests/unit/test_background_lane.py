"""The background lane (tierbatch/tasks/lane.py, worker/lane.py) without a database: which work takes it,
its bound, its beat and queue, its handling of a 429; and error bodies of a server that are not OpenAI's
JSON (llama-server's plain text, a proxy's HTML, a traceback) turned into our own messages."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import httpx2
import pytest

from tierbatch.base.config import AppConfig, default_config_data, parse_config
from tierbatch.base.errors import PermanentProviderError, RetryableProviderError
from tierbatch.base.messaging import ALL_QUEUES, CALL_LANE, LANE_PUMP, TASK_ROUTES
from tierbatch.base.states import Tier
from tierbatch.cli.stack.toml_writer import deep_merge
from tierbatch.providers.client import ChatResult, ProviderClients
from tierbatch.routing.tiers import DEFAULT_LANE_CONCURRENCY, lane_bound, lane_provider, takes_background_lane
from tierbatch.worker.app import beat_schedule
from tierbatch.worker.immediate import PushedBack
from tierbatch.worker.lane import honouring_rate_limits


def config_with(open_provider: Mapping[str, Any] | None) -> AppConfig:
    data = default_config_data()
    if open_provider is not None:
        data = deep_merge(data, {"providers": {"open": {"base_url": "http://127.0.0.1:1/v1", **open_provider}},
                                 "tiers": {"light": {"provider": "open", "model": "smollm2-135m"}}})
    return parse_config(data, environ={})


def test_non_urgent_light_work_takes_the_lane_only_on_a_light_provider_without_a_batch_api() -> None:
    batch = config_with(None)
    lane = config_with({"batch": False, "max_concurrency": 3})
    assert lane_provider(batch) is None and not takes_background_lane(batch, Tier.LIGHT, False)
    assert lane_provider(lane) == "open" and lane_bound(lane) == 3
    assert takes_background_lane(lane, Tier.LIGHT, False)
    assert not takes_background_lane(lane, Tier.LIGHT, True)  # urgent: an immediate call
    assert not takes_background_lane(lane, Tier.COMPLEX, False)
    assert lane_bound(config_with({"batch": False})) == DEFAULT_LANE_CONCURRENCY


def test_the_lane_has_its_own_queue_and_a_beat_only_where_it_is_used() -> None:
    assert TASK_ROUTES[CALL_LANE]["queue"] in ALL_QUEUES
    assert TASK_ROUTES[CALL_LANE]["queue"] != TASK_ROUTES["tierbatch.call_immediate"]["queue"]
    assert all(entry["task"] != LANE_PUMP for entry in beat_schedule(config_with(None)).values())
    assert any(entry["task"] == LANE_PUMP for entry in beat_schedule(config_with({"batch": False})).values())


class FakeRedis:
    def __init__(self) -> None:
        self.expiry: dict[str, int] = {}

    def pttl(self, key: str) -> int:
        return self.expiry.get(key, -2)

    def set(self, key: str, value: str, px: int) -> None:
        self.expiry[key] = px

    def exists(self, key: str) -> int:
        return int(key in self.expiry)


def answering(error: Exception | None) -> Any:
    def call(provider: str, model: str, request: Mapping[str, Any]) -> ChatResult:
        if error is not None:
            raise error
        raise AssertionError("not expected")

    return call


def test_a_429_of_the_lanes_provider_pauses_the_lane_and_puts_the_task_back() -> None:
    config = config_with({"batch": False})
    redis = FakeRedis()
    ctx: Any = types.SimpleNamespace(config=config, redis=redis, settings=types.SimpleNamespace(redis_key_prefix="p:"))
    wrap = honouring_rate_limits(ctx, "open")
    limited = RetryableProviderError("open/smollm2-135m: HTTP 429: slow down", status_code=429, provider="open",
                                     model="smollm2-135m", retry_after=7.0)
    with pytest.raises(PushedBack) as pushed:
        wrap(answering(limited))("open", "smollm2-135m", {})
    assert pushed.value.delay == min(7.0, config.immediate.backoff_max_seconds)
    assert redis.expiry == {"p:tierbatch:lane:open:paused": int(pushed.value.delay * 1000)}
    # a shorter retry-after does not end a longer pause
    shorter = RetryableProviderError("slow", status_code=429, provider="open", model="m", retry_after=0.001)
    with pytest.raises(PushedBack):
        wrap(answering(shorter))("open", "m", {})
    assert redis.expiry["p:tierbatch:lane:open:paused"] == int(pushed.value.delay * 1000)
    # other providers' 429s and other errors go along the chain as usual
    other = RetryableProviderError("sim: 429", status_code=429, provider="sim", model="gpt-4o-mini")
    for error, name in ((other, "sim"), (RetryableProviderError("open: 503", status_code=503), "open"),
                        (PermanentProviderError("open: 400", status_code=400), "open")):
        with pytest.raises(type(error)):
            wrap(answering(error))(name, "m", {})


@pytest.mark.parametrize(("status", "content_type", "content", "kind", "message"), [
    (500, "text/plain; charset=utf-8", b'Traceback (most recent call last):\n  File "/srv/app.py", line 3\nKeyError',
     RetryableProviderError, "the provider answered with a body that is not JSON (text/plain, 72 bytes)"),
    (502, "text/html", b"<html><body>Bad Gateway</body></html>", RetryableProviderError,
     "the provider answered with a body that is not JSON (text/html, 37 bytes)"),
    (400, "application/json", b'{"detail": "nope"}', PermanentProviderError,
     "the provider answered with a JSON body without an error message (application/json, 18 bytes)"),
    (400, "application/json",
     b'{"error": {"code": 400, "message": "the request exceeds the available context size",'
     b' "type": "exceed_context_size_error"}}', PermanentProviderError,
     "the request exceeds the available context size"),
])
def test_error_bodies_that_are_not_openais_become_messages_of_our_own(status: int, content_type: str,
                                                                      content: bytes, kind: type,
                                                                      message: str) -> None:
    config = config_with({"batch": False})
    clients = ProviderClients(config, transport=httpx2.MockTransport(
        lambda _: httpx2.Response(status, headers={"content-type": content_type}, content=content)))
    try:
        with pytest.raises(kind) as caught:
            clients.chat("open", "smollm2-135m", {"messages": [{"role": "user", "content": "hi"}]})
    finally:
        clients.close()
    assert caught.value.message == f"open/smollm2-135m: HTTP {status}: {message}"
    assert "Traceback" not in caught.value.message and "<html>" not in caught.value.message
