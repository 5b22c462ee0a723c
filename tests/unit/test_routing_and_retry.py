from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tierbatch.base.config import ImmediateConfig, ModelRef, default_config_data, parse_config
from tierbatch.base.errors import ChainExhausted, PermanentProviderError, RetryableProviderError
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.providers.adapter import ChatResult
from tierbatch.providers.retry import backoff_delay, call_with_fallbacks
from tierbatch.routing.tiers import classify_prompt, resolve_tier, takes_batch_path

CONFIG = parse_config(default_config_data(), environ={})


@pytest.mark.parametrize(("text", "tier"), [
    ("Is this review positive? 'Great phone'", Tier.LIGHT),
    ("Explain step by step how to prove the lemma", Tier.COMPLEX),
    ("```python\ndef f(x):\n  return x\n```\nwhat is wrong?", Tier.COMPLEX),
    ("word " * 2000, Tier.COMPLEX),
])
def test_heuristic_classifier(text: str, tier: Tier) -> None:
    decision = classify_prompt(text)
    assert decision.tier is tier
    assert decision.reason.startswith("auto:")


def test_tools_make_a_prompt_complex() -> None:
    assert classify_prompt("hi", tools_requested=True).tier is Tier.COMPLEX


def test_resolution_order_explicit_then_config_then_heuristic() -> None:
    messages = [{"role": "user", "content": "Explain step by step"}]
    assert resolve_tier(CONFIG, RequestedTier.LIGHT, "reasoning", messages).tier is Tier.LIGHT
    decision = resolve_tier(CONFIG, RequestedTier.AUTO, "reasoning", [{"role": "user", "content": "hi"}])
    assert decision.tier is Tier.COMPLEX and "config routing" in decision.reason
    assert resolve_tier(CONFIG, RequestedTier.AUTO, "general", messages).tier is Tier.COMPLEX
    assert resolve_tier(CONFIG, RequestedTier.AUTO, "general", [{"role": "user", "content": "hi"}]).tier is Tier.LIGHT


def test_batch_path_unless_urgent_complex_or_near_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert takes_batch_path(CONFIG, Tier.LIGHT, False, None, now)
    assert not takes_batch_path(CONFIG, Tier.LIGHT, True, None, now)
    assert not takes_batch_path(CONFIG, Tier.COMPLEX, False, None, now)
    promise = CONFIG.batch.max_wait_seconds + CONFIG.batch.expected_turnaround_seconds
    assert not takes_batch_path(CONFIG, Tier.LIGHT, False, now + timedelta(seconds=promise - 1), now)
    assert takes_batch_path(CONFIG, Tier.LIGHT, False, now + timedelta(seconds=promise + 1), now)


def _result(provider: str, model: str) -> ChatResult:
    return ChatResult(provider, model, model, {}, "ok", TokenUsage(1, 0, 1), 1)


class ScriptedProvider:
    def __init__(self, script: Mapping[str, list[Exception | None]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[str] = []

    def __call__(self, provider: str, model: str, request: Mapping[str, Any]) -> ChatResult:
        self.calls.append(model)
        outcome = self.script[model].pop(0) if self.script.get(model) else None
        if outcome is not None:
            raise outcome
        return _result(provider, model)


POLICY = ImmediateConfig(retries_per_model=2, backoff_base_seconds=1, backoff_max_seconds=10)
CHAIN = [ModelRef(provider="p", model="a"), ModelRef(provider="p", model="b")]


def test_retryable_errors_are_retried_honouring_retry_after_then_fall_back() -> None:
    busy = RetryableProviderError("429", status_code=429, retry_after=3.0)
    provider = ScriptedProvider({"a": [busy, busy, busy]})
    sleeps: list[float] = []
    result = call_with_fallbacks(provider, CHAIN, {}, POLICY, sleeps.append)
    assert result.served_model == "b"
    assert provider.calls == ["a", "a", "a", "b"]
    assert sleeps == [3.0, 3.0]


def test_permanent_error_moves_on_without_retrying() -> None:
    provider = ScriptedProvider({"a": [PermanentProviderError("404")], "b": [PermanentProviderError("400")]})
    with pytest.raises(ChainExhausted) as caught:
        call_with_fallbacks(provider, CHAIN, {}, POLICY, lambda _: None)
    assert provider.calls == ["a", "b"]
    assert not caught.value.retryable
    assert str(caught.value) == "404; 400"


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_delay(POLICY, n, None) for n in range(5)] == [1, 2, 4, 8, 10]
    assert backoff_delay(POLICY, 0, 60.0) == 10
