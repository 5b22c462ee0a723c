"""Provider prompt caching without services: the `prompt_cache_key` we send, where it is added (and
where not), the stable prefix of a job's requests, and the simulator accepting and counting keys."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tierbatch.base.config import AppConfig
from tierbatch.jobs.requests import JobItem, JobSettings
from tierbatch.jobs.rows import RequestEncoder
from tierbatch.providers.cache_keys import prompt_cache_key, with_prompt_cache_key
from tierbatch.providers.client import ProviderClients
from tierbatch.simulator.batch_input import parse_input
from tierbatch.simulator.completions import validate_chat_request
from tierbatch.simulator.errors import OpenAIError
from tierbatch.simulator.stats import Stats

TENANT = uuid.UUID("00000000-0000-0000-0000-000000000001")


def config(*, keyed: bool = True) -> AppConfig:
    return AppConfig.model_validate({
        "providers": {"on": {"base_url": "http://127.0.0.1:1/v1"},
                      "off": {"base_url": "http://127.0.0.1:2/v1", "prompt_cache_key": keyed}},
        "tiers": {"light": {"provider": "on", "model": "small"}, "complex": {"provider": "off", "model": "big"}},
    })


def test_the_key_is_per_task_type_and_tenant_and_fits_openai_limits() -> None:
    key = prompt_cache_key("classification", TENANT)
    assert key.startswith("tierbatch-classification-") and len(key) == len("tierbatch-classification-") + 8
    assert key == prompt_cache_key("classification", str(TENANT))  # stable: same routing every call
    assert key != prompt_cache_key("classification", uuid.uuid4())
    assert key != prompt_cache_key("extraction", TENANT)
    assert str(TENANT) not in key  # the tenant id itself never goes to the provider
    assert prompt_cache_key("classification") == "tierbatch-classification"
    for task_type in ("x" * 100, "tâche spéciale", "a b", "é" * 100):
        long_key = prompt_cache_key(task_type, TENANT)
        assert len(long_key) <= 64 and long_key.isascii()
    assert prompt_cache_key("a b", TENANT) != prompt_cache_key("a_b", TENANT)


def test_a_request_with_its_own_key_keeps_it() -> None:
    request: dict[str, Any] = {"messages": []}
    assert with_prompt_cache_key(request, "k") == {"messages": [], "prompt_cache_key": "k"}
    assert request == {"messages": []}  # the stored request is never changed
    own = {"messages": [], "prompt_cache_key": "mine"}
    assert with_prompt_cache_key(own, "k") is own
    assert with_prompt_cache_key(request, None) is request


class _FakeCompletions:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        body = {"model": kwargs["model"], "choices": [{"message": {"content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        return SimpleNamespace(model_dump=lambda **_: body)


@pytest.mark.parametrize("keyed", [True, False])
def test_immediate_calls_carry_the_key_where_the_provider_takes_it(keyed: bool) -> None:
    clients = ProviderClients(config(keyed=keyed))
    fake = _FakeCompletions()
    for name in ("on", "off"):
        clients._clients[name] = SimpleNamespace(chat=SimpleNamespace(completions=fake))  # type: ignore[assignment]
    request = {"messages": [{"role": "user", "content": "hi"}]}
    call = clients.chat_for("classification", TENANT)
    call("on", "small", request)
    call("off", "big", request)
    clients.chat("on", "small", request)  # no key asked for: none sent
    expected = prompt_cache_key("classification", TENANT)
    assert fake.calls[0]["prompt_cache_key"] == expected
    assert ("prompt_cache_key" in fake.calls[1]) is keyed
    assert "prompt_cache_key" not in fake.calls[2]
    assert request == {"messages": [{"role": "user", "content": "hi"}]}


def test_a_job_request_keeps_a_stable_prefix_with_the_item_text_last() -> None:
    system = "You route tickets. " * 50
    settings = JobSettings(system=system, template="Ticket: {text}\nAnswer briefly.",
                           labels=("billing", "bug"))
    encode = RequestEncoder(settings).encode
    first, second = encode(JobItem("1", "card charged twice", None)), encode(JobItem("2", "app crashes", None))
    messages = json.loads(first)["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "Ticket: card charged twice\nAnswer briefly."
    # everything up to the item's text is the same bytes for every item of the job
    shared = first[:next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)]
    assert shared.endswith('"Ticket: ') and system in shared
    assert list(json.loads(first))[:1] == ["messages"]  # messages first, params after


def test_the_simulator_takes_a_key_and_refuses_a_bad_one() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt_cache_key": "tierbatch-a"}
    assert validate_chat_request(body)[1]["prompt_cache_key"] == "tierbatch-a"
    with pytest.raises(OpenAIError) as refused:
        validate_chat_request({**body, "prompt_cache_key": 7})
    assert (refused.value.status, refused.value.param) == (400, "prompt_cache_key")


def test_the_simulator_counts_keys_of_batch_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": "x"}],
                       **({"prompt_cache_key": f"k{i % 2}"} if i < 5 else {})}} for i in range(6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parsed = parse_input(path, "/v1/chat/completions", 50_000, 200_000_000)
    assert parsed.errors == [] and dict(parsed.prompt_cache_keys) == {"k0": 3, "k1": 2}
    stats = Stats()
    stats.prompt_cache_keys.update(parsed.prompt_cache_keys)
    assert stats.as_dict()["prompt_cache_keys"] == {"k0": 3, "k1": 2}
    stats.reset()
    assert stats.as_dict()["prompt_cache_keys"] == {}
