"""The gateway's own list of chat request fields (`tierbatch.gateway.fields`): what its docstring documents is
exactly what is accepted, whatever the installed SDK knows; refused fields and values name the field;
requests that Postgres could not record are refused, without recursion, before any provider call."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from typing import Any

import pytest

from tierbatch.base.inputs import storable, storable_text
from tierbatch.gateway import fields as chat_fields
from tierbatch.gateway.fields import (
    ACCEPTED_FIELDS,
    CONSUMED_FIELDS,
    FORWARDED_FIELDS,
    MAX_DEPTH,
    REFUSED_FIELDS,
    check_fields,
    check_storable,
)
from tierbatch.providers.openai_validation import InvalidRequest

HI = [{"role": "user", "content": "hi"}]


def documented(section: str) -> set[str]:
    """The field names the module docstring lists in the section whose paragraph starts with `section`."""
    doc = chat_fields.__doc__ or ""
    paragraphs = doc.split("\n\n")
    start = next(i for i, p in enumerate(paragraphs) if p.startswith(section))
    bullets = paragraphs[start + 1].replace("\n  ", " ").splitlines()
    names: set[str] = set()
    for bullet in bullets:
        assert bullet.startswith("- "), bullet
        fields, _, _ = bullet[2:].partition(": ")
        names |= set(re.findall(r"`([a-z_]+)`", fields))
    return names


def test_the_accepted_fields_are_the_documented_list() -> None:
    assert documented("Forwarded to the provider") == FORWARDED_FIELDS
    assert documented("Consumed by the gateway") == CONSUMED_FIELDS
    assert documented("Refused whenever set") == set(REFUSED_FIELDS)
    assert ACCEPTED_FIELDS == FORWARDED_FIELDS | CONSUMED_FIELDS
    assert not ACCEPTED_FIELDS & set(REFUSED_FIELDS)


def test_the_list_does_not_follow_the_installed_sdk() -> None:
    from openai.resources.chat.completions import AsyncCompletions

    sdk = set(inspect.signature(AsyncCompletions.create).parameters) - {
        "self", "extra_headers", "extra_query", "extra_body", "timeout"}
    # fields the SDK sends that this gateway refuses: billed unpriced, or keeping data at the provider
    assert {"web_search_options", "audio"} <= sdk - ACCEPTED_FIELDS
    # and the module never imports the SDK: its list cannot change with an SDK release
    probe = (
        "import json, sys\n"
        "import tierbatch.gateway.fields\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('openai', 'tierbatch'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["tierbatch", "tierbatch.base", "tierbatch.base.errors",
                               "tierbatch.base.inputs", "tierbatch.gateway", "tierbatch.gateway.fields",
                               "tierbatch.providers", "tierbatch.providers.openai_validation"]


def refusal(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check_fields({"model": "smart-select", "messages": HI, **body})
    return caught.value


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"service_tier": "priority"}, "service_tier", "unsupported_value"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ({"service_tier": "scale"}, "service_tier", "unsupported_value"),
    ({"service_tier": "fast"}, "service_tier", "unsupported_value"),
    ({"service_tier": 1}, "service_tier", "invalid_type"),
    ({"store": True}, "store", "unsupported_value"),
    ({"store": "yes"}, "store", "invalid_type"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "unsupported_parameter"),
    ({"prompt_cache_options": {"ttl": "30m"}}, "prompt_cache_options", "unsupported_parameter"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention", "unsupported_value"),
    ({"modalities": ["text", "audio"]}, "modalities[1]", "unsupported_value"),
    ({"modalities": "text"}, "modalities", "invalid_type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "web_search"}]}, "tools[1].type",
     "unsupported_value"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type", "unsupported_value"),
    ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"extra_body": {"service_tier": "priority"}}, "extra_body", "unknown_parameter"),
])
def test_unpriced_or_data_keeping_fields_are_refused_by_name(body: dict[str, Any], param: str, code: str) -> None:
    error = refusal(body)
    assert (error.param, error.code) == (param, code)


def test_what_the_ledger_prices_passes() -> None:
    check_fields({"model": "smart-select", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        "service_tier": "auto", "store": False, "modalities": ["text"], "prompt_cache_retention": "in_memory",
        "web_search_options": None, "audio": None, "tools": [{"type": "custom", "custom": {"name": "c"}}],
        "prediction": {"type": "content", "content": "x"}, "verbosity": "low", "safety_identifier": "u1",
        "metadata": {"tier": "light"}, "stream": False})
    check_fields({"model": "m", "messages": HI, "service_tier": "default", "store": None})


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    ({"metadata": {"team": "x\u0000"}}, "metadata.team"),
    ({"metadata": {"te\u0000am": "x"}}, "metadata.te\\u0000am"),
    ({"mo\udc80del": "x"}, "mo\\udc80del"),
    ({"model": "\u0000"}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "\udfff"}}}]},
     "tools[0].function.parameters.description"),
])
def test_strings_postgres_cannot_store_are_refused_by_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_storable({"model": "m", "messages": HI, **body})
    assert (caught.value.param, caught.value.code) == (param, "invalid_value")
    # the answer can be encoded whatever the request held (a raw surrogate would fail the response)
    json.dumps({"message": caught.value.message, "param": caught.value.param}, ensure_ascii=False).encode()


@pytest.mark.parametrize("raw", ['{"temperature": NaN}', '{"tools": [{"parameters": {"default": Infinity}}]}',
                                 '{"logit_bias": {"1": -Infinity}}', '{"seed": 1e999}'])
def test_numbers_that_are_not_json_are_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_storable(json.loads(raw))
    assert caught.value.code == "invalid_value" and caught.value.param in (
        "temperature", "tools[0].parameters.default", "logit_bias.1", "seed")
    check_storable({"temperature": 0.5, "seed": 1, "x": [1.5e300, -2.0]})


def test_paired_surrogates_and_plain_text_are_storable() -> None:
    check_storable({"messages": [{"role": "user", "content": "emoji 😀, accents é, CJK 漢字"}]})


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(200_000):  # far past the interpreter's recursion limit
        deep = [deep]
    with pytest.raises(InvalidRequest) as caught:
        check_storable({"messages": HI, "tools": deep})
    assert caught.value.code == "invalid_value" and caught.value.param is not None
    assert caught.value.param.startswith("tools")
    shallow: Any = "x"
    for _ in range(MAX_DEPTH - 2):
        shallow = {"a": shallow}
    check_storable({"tools": shallow})


def test_what_a_provider_answers_is_made_storable() -> None:
    assert storable_text("plain") == "plain"
    assert storable_text("a\u0000b\ud800c😀") == "a\ufffdb\ufffdc😀"
    assert storable({"k\u0000": ["\udc00", 1, None, {"x": "ok"}]}) == {"k\ufffd": ["\ufffd", 1, None, {"x": "ok"}]}
