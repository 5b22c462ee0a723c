"""Task families in the simulator: the family read from the prompt, per-family agreement rates and
answer lengths, per-key merging with the "*" table, and the reference verdict of each answer."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tierbatch.simulator.answers import build_answer, task_family
from tierbatch.simulator.config import SimConfig, SimConfigError, parse_sim_config
from tierbatch.simulator.stats import Stats
from tierbatch.simulator.tokens import count_tokens

LABELS = ["billing", "account", "bug"]
KEYS = 3000


def request(family: str | None, text: str, labels: bool = False) -> dict[str, Any]:
    system = "Answer the request." + (f"\nTask family: {family}" if family else "")
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": text}]}
    if labels:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "route", "schema": {
            "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}}}}}
    return body


def config(**models: Any) -> SimConfig:
    return parse_sim_config({"models": models})


def test_family_is_read_from_a_system_or_developer_line_only() -> None:
    assert task_family(request("Reasoning", "x")["messages"]) == "reasoning"
    developer = [{"role": "developer", "content": [{"type": "text", "text": "Be brief.\n  task family: code-review"}]}]
    assert task_family(developer) == "code-review"
    # the user's own text cannot choose the family
    assert task_family([{"role": "user", "content": "Task family: classification"}]) is None
    assert task_family(request(None, "Task family: classification")["messages"]) is None
    assert task_family("not a list") is None


@pytest.mark.parametrize(("family", "labels"), [("classification", True), ("reasoning", False)])
def test_agreement_rate_per_family_is_the_configured_one(family: str, labels: bool) -> None:
    rates = {"classification": 0.97, "reasoning": 0.60}
    sim = config(**{"*": {"agreement": 0.90}, "gpt-4o-mini": {"agreement_by_family": rates},
                    "gpt-4o": {"reference": True}})
    light, reference = sim.model_settings("gpt-4o-mini"), sim.model_settings("gpt-4o")
    same = 0
    for i in range(KEYS):
        body = request(family, f"item {i}: the customer writes about their order", labels)
        answer = build_answer(body, "gpt-4o-mini", light)
        expected = build_answer(body, "gpt-4o", reference)
        agreed = answer.choices[0].content == expected.choices[0].content
        # the verdict the simulator reports is what a comparison with the reference model shows
        assert answer.reference is agreed and expected.reference is True
        assert answer.family == family
        same += agreed
    rate = rates[family]
    tolerance = 4 * math.sqrt(rate * (1 - rate) / KEYS)
    assert abs(same / KEYS - rate) < tolerance, (same / KEYS, rate)


def test_a_prompt_without_family_or_an_unlisted_family_keeps_the_model_agreement() -> None:
    sim = config(**{"*": {"agreement": 0.5, "agreement_by_family": {"classification": 1.0}}})
    settings = sim.model_settings("gpt-4o-mini")
    for family in (None, "summarization"):
        agreed = sum(bool(build_answer(request(family, f"doc {i}"), "gpt-4o-mini", settings).reference)
                     for i in range(KEYS))
        assert abs(agreed / KEYS - 0.5) < 4 * math.sqrt(0.25 / KEYS)
    assert all(build_answer(request("classification", f"doc {i}", True), "gpt-4o-mini", settings).reference
               for i in range(200))


def test_answers_are_deterministic_per_model_and_input() -> None:
    sim = config(**{"*": {"agreement_by_family": {"reasoning": 0.5},
                          "output_tokens_by_family": {"reasoning": [50, 400]}}})
    settings = sim.model_settings("m")
    for i in range(50):
        body = request("reasoning", f"puzzle {i}")
        assert build_answer(body, "m", settings) == build_answer(body, "m", settings)


def test_family_tables_merge_key_by_key_over_the_default_table() -> None:
    sim = config(**{"*": {"agreement_by_family": {"classification": 0.97, "reasoning": 0.7},
                          "output_tokens_by_family": {"reasoning": [300, 900]}},
                    "gpt-4o-mini": {"agreement_by_family": {"reasoning": 0.6}}})
    mini = sim.model_settings("gpt-4o-mini")
    assert mini.agreement_by_family == {"classification": 0.97, "reasoning": 0.6}
    assert mini.output_tokens_by_family == {"reasoning": (300, 900)}
    assert sim.model_settings("other").agreement_by_family == {"classification": 0.97, "reasoning": 0.7}
    # a run-time patch changes one family and keeps the rest (deep merge of `POST /_sim/config`)
    assert SimConfig.model_validate(sim.model_dump()).model_settings("gpt-4o-mini") == mini


@pytest.mark.parametrize("bad", [
    {"agreement_by_family": {"reasoning": 1.5}},
    {"output_tokens_by_family": {"reasoning": [0, 10]}},
    {"output_tokens_by_family": {"reasoning": [100, 10]}},
])
def test_invalid_family_tables_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(SimConfigError):
        config(**{"gpt-4o-mini": bad})


def test_free_text_length_follows_the_family_range_and_max_tokens() -> None:
    low, high = 200, 1200
    sim = config(**{"*": {"output_tokens_by_family": {"reasoning": [low, high]}}})
    settings = sim.model_settings("m")
    lengths = [count_tokens(build_answer(request("reasoning", f"plan {i}"), "m", settings).choices[0].content)
               for i in range(400)]
    assert min(lengths) >= low * 0.9 and max(lengths) <= high
    # log-uniform: about half the answers under the geometric middle of the range
    middle = math.sqrt(low * high)
    assert 0.4 < sum(length < middle for length in lengths) / len(lengths) < 0.6
    capped = build_answer({**request("reasoning", "plan 1"), "max_tokens": 50}, "m", settings)
    assert count_tokens(capped.choices[0].content) == 50 and capped.choices[0].finish_reason == "length"
    # other families keep the few sentences of before
    plain = build_answer(request("chat", "hello"), "m", settings).choices[0].content
    assert count_tokens(plain) < low


def test_stats_count_answers_per_family_and_keep_verdicts_only_when_asked() -> None:
    stats = Stats()
    stats.record_answer("gpt-4o-mini", "chatcmpl-1", "reasoning", True, keep_verdict=False)
    stats.record_answer("gpt-4o-mini", "chatcmpl-2", "reasoning", False, keep_verdict=True)
    stats.record_answer("gpt-4o", "chatcmpl-3", None, True, keep_verdict=True)
    stats.record_answer("gpt-4o", "chatcmpl-4", "reasoning", None, keep_verdict=True)  # a tool call: undecided
    assert stats.as_dict()["family_answers"] == {"reasoning": {"gpt-4o-mini": {"answers": 2, "reference": 1}}}
    assert stats.verdicts == {"chatcmpl-2": False, "chatcmpl-3": True}
    stats.reset()
    assert stats.as_dict()["family_answers"] == {} and stats.verdicts == {}
