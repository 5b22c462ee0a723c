"""Which requests the response cache takes, and what makes two requests the same (tierbatch/cache/responses.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tierbatch.base.config import CacheConfig
from tierbatch.cache.responses import cache_key, is_deterministic, wants_cache

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("request_body", "expected"), [
    ({"messages": HI, "temperature": 0}, True),
    ({"messages": HI, "temperature": 0.0, "seed": 4}, True),
    ({"messages": HI, "seed": 4}, True),
    ({"messages": HI}, False),  # provider default temperature: answers vary
    ({"messages": HI, "temperature": 0.7, "seed": 4}, False),
    ({"messages": HI, "temperature": 0, "n": 3}, False),  # several choices: not one answer
    ({"messages": HI, "temperature": 0, "n": 1}, True),
])
def test_deterministic_requests(request_body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(request_body) is expected


def test_policies_and_the_metadata_switch() -> None:
    config = CacheConfig(task_types={"faq": "always", "chat": "off"})
    sampled = {"messages": HI, "temperature": 0.9}
    fixed = {"messages": HI, "temperature": 0}
    assert wants_cache(config, "general", fixed, {}) is True
    assert wants_cache(config, "general", sampled, {}) is False
    assert wants_cache(config, "faq", sampled, None) is True
    assert wants_cache(config, "chat", fixed, {}) is False
    assert wants_cache(config, "general", fixed, {"cache": "off"}) is False
    assert wants_cache(config, "general", sampled, {"cache": "on"}) is True
    assert wants_cache(CacheConfig(enabled=False), "faq", fixed, {"cache": "on"}) is False


def test_key_covers_model_messages_and_parameters_only() -> None:
    base = {"messages": HI, "temperature": 0, "max_tokens": 5}
    key = cache_key("gpt-4o-mini", base)
    assert len(key) == 32
    # what does not change the answer is left out; key order does not matter
    assert cache_key("gpt-4o-mini", {"max_tokens": 5, "temperature": 0, "messages": HI, "stream": True,
                                     "metadata": {"cache": "on"}, "user": "u1",
                                     "prompt_cache_key": "x"}) == key
    assert cache_key("gpt-4o", base) != key
    assert cache_key("gpt-4o-mini", {**base, "max_tokens": 6}) != key
    assert cache_key("gpt-4o-mini", {**base, "messages": [{"role": "user", "content": "hi!"}]}) != key
    assert cache_key("gpt-4o-mini", {**base, "response_format": {"type": "json_object"}}) != key


def test_a_bad_cache_switch_is_refused_naming_it() -> None:
    from tierbatch.api.errors import status_of
    from tierbatch.base.errors import InvalidInput, Refused
    from tierbatch.gateway.validation import validate_chat_body
    from tierbatch.jobs.requests import parse_job_request
    from tierbatch.tasks.submission import parse_submission

    with pytest.raises(InvalidInput) as task:
        parse_submission({"prompt": "hi", "metadata": {"cache": "maybe"}}, 10, 1 << 20)
    assert (task.value.param, status_of(task.value)) == ("metadata", 422)
    assert "metadata.cache must be \"on\" or \"off\" (got 'maybe')" in task.value.message
    with pytest.raises(InvalidInput) as job:
        parse_job_request({"metadata": {"cache": "yes"}, "items": [{"id": "1", "text": "x"}]}, 1 << 20)
    assert job.value.param == "metadata" and "metadata.cache" in job.value.message
    with pytest.raises(Refused) as chat:
        validate_chat_body({"model": "smart-select", "messages": HI, "metadata": {"cache": "sometimes"}})
    assert (status_of(chat.value), chat.value.param, chat.value.code) == (400, "metadata.cache", "invalid_value")
    # the two values are accepted everywhere
    for switch in ("on", "off"):
        parse_submission({"prompt": "hi", "metadata": {"cache": switch}}, 10, 1 << 20)
        validate_chat_body({"model": "smart-select", "messages": HI, "metadata": {"cache": switch}})
