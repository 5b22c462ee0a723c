"""Deterministic answers: labels, reference and agreement, free text, truncation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tierbatch.simulator.answers import (
    build_answer,
    choose_label,
    find_label_task,
    input_key,
    reference_label,
    stable_hash,
)
from tierbatch.simulator.config import ModelSettings

LABELS = ("billing", "account", "bug")
PLAIN = ModelSettings()


def messages(text: str, system: str = "Route the ticket.") -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "classification", "strict": True, "schema": schema}}


def label_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"label": {"type": "string", "enum": list(LABELS)}},
            "required": ["label"], "additionalProperties": False}


def test_stable_hash_is_a_fixed_function() -> None:
    # the same in every process: a regression here changes every simulated answer
    assert stable_hash("reference", "abc") == stable_hash("reference", "abc")
    assert stable_hash("a", "bc") != stable_hash("ab", "c")


def test_same_request_same_answer() -> None:
    body = {"model": "m", "messages": messages("Hello there, summarise this.")}
    first = build_answer(body, "m", PLAIN)
    second = build_answer(json.loads(json.dumps(body)), "m", PLAIN)
    assert first == second
    assert first.choices[0].finish_reason == "stop"
    assert len(first.choices[0].content.split(".")) >= 3  # a few sentences


def test_enum_anywhere_in_schema_fills_its_property() -> None:
    nested = {
        "type": "object",
        "$defs": {"Category": {"type": "string", "enum": list(LABELS)}},
        "properties": {
            "reasoning": {"type": "string"},
            "result": {"type": "object", "properties": {"category": {"$ref": "#/$defs/Category"},
                                                        "confidence": {"type": "number"}}},
        },
        "required": ["reasoning", "result"],
    }
    body = {"model": "m", "messages": messages("charged twice"), "response_format": schema_format(nested)}
    task = find_label_task(body)
    assert task is not None and task.labels == LABELS and task.path == ("result", "category")
    answer = json.loads(build_answer(body, "m", ModelSettings(reference=True)).choices[0].content)
    assert answer["result"]["category"] == reference_label(LABELS, input_key(body["messages"]))
    assert isinstance(answer["reasoning"], str) and isinstance(answer["result"]["confidence"], float)


def test_enum_at_the_root_answers_a_json_string() -> None:
    body = {"model": "m", "messages": messages("x"),
            "response_format": schema_format({"type": "string", "enum": ["yes", "no"]})}
    content = build_answer(body, "m", PLAIN).choices[0].content
    assert json.loads(content) in ("yes", "no")


def test_labels_line_answers_the_bare_label() -> None:
    body = {"model": "m", "messages": messages("Ticket: my card was charged twice\nLabels: billing, account, bug")}
    task = find_label_task(body)
    assert task is not None and task.labels == LABELS and task.schema is None
    content = build_answer(body, "ref", ModelSettings(reference=True)).choices[0].content
    assert content == reference_label(LABELS, input_key(body["messages"]))
    # content given as parts works the same
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi\nlabels: a, b"}]}]
    assert find_label_task({"messages": parts}) is not None


def test_reference_label_depends_on_messages_only() -> None:
    keys = [input_key(messages(f"ticket {i}")) for i in range(300)]
    chosen = [reference_label(LABELS, k) for k in keys]
    assert set(chosen) == set(LABELS)  # spread over the labels
    for model in ("gpt-4o", "gpt-4o-mini"):
        settings = ModelSettings(reference=True)
        assert [choose_label(LABELS, model, settings, k) for k in keys] == chosen


@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.8, 1.0])
def test_agreement_rate(agreement: float) -> None:
    settings = ModelSettings(agreement=agreement)
    keys = [input_key(messages(f"item {i}")) for i in range(2000)]
    same = sum(choose_label(LABELS, "light", settings, k) == reference_label(LABELS, k) for k in keys)
    assert abs(same / len(keys) - agreement) < 0.04
    # disagreement always picks another label, and is itself stable
    for k in keys[:50]:
        assert choose_label(LABELS, "light", settings, k) == choose_label(LABELS, "light", settings, k)


def test_agreement_is_decided_per_model() -> None:
    settings = ModelSettings(agreement=0.5)
    keys = [input_key(messages(f"item {i}")) for i in range(400)]
    a = [choose_label(LABELS, "model-a", settings, k) for k in keys]
    b = [choose_label(LABELS, "model-b", settings, k) for k in keys]
    assert a != b


def test_free_text_agreement_follows_the_same_rule() -> None:
    body = {"model": "m", "messages": messages("Summarise the quarterly report.")}
    reference = build_answer(body, "big", ModelSettings(reference=True)).choices[0].content
    assert build_answer(body, "small", ModelSettings(agreement=1.0)).choices[0].content == reference
    assert build_answer(body, "small", ModelSettings(agreement=0.0)).choices[0].content != reference


def test_max_tokens_truncates_free_text() -> None:
    body = {"model": "m", "messages": messages("Write something long."), "max_tokens": 3}
    answer = build_answer(body, "m", PLAIN)
    assert answer.choices[0].finish_reason == "length"
    assert len(answer.choices[0].content) <= 12
    assert answer.completion_tokens == 3
    body = {"model": "m", "messages": messages("Write something long."), "max_completion_tokens": 4}
    assert build_answer(body, "m", PLAIN).completion_tokens == 4


def test_n_choices_and_reasoning_tokens() -> None:
    body = {"model": "m", "messages": messages("Say things."), "n": 3}
    answer = build_answer(body, "m", ModelSettings(reasoning_tokens=100))
    assert len(answer.choices) == 3
    assert len({c.content for c in answer.choices}) > 1
    assert answer.reasoning_tokens == 300
    visible = sum(-(-len(c.content) // 4) for c in answer.choices)
    assert answer.completion_tokens == visible + 300


def test_json_object_and_schema_without_enum() -> None:
    body = {"model": "m", "messages": messages("Extract."), "response_format": {"type": "json_object"}}
    assert isinstance(json.loads(build_answer(body, "m", PLAIN).choices[0].content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}},
                                               "nick": {"type": ["string", "null"]}}}
    body = {"model": "m", "messages": messages("Extract."), "response_format": schema_format(schema)}
    value = json.loads(build_answer(body, "m", PLAIN).choices[0].content)
    assert set(value) == {"name", "age", "tags", "nick"}
    assert isinstance(value["age"], int) and isinstance(value["tags"], list)


def test_prompt_tokens_are_a_quarter_of_the_characters() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 401}]}
    assert build_answer(body, "m", PLAIN).prompt_tokens == 101
