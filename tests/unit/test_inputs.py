"""Input checks before anything is stored: nesting without recursion, NUL and lone surrogates named."""

from __future__ import annotations

import json

import pytest

from tierbatch.api.errors import status_of
from tierbatch.base.errors import InvalidInput
from tierbatch.base.inputs import (
    MAX_JSON_DEPTH,
    NotJson,
    TooDeep,
    Unstorable,
    check_text,
    loads_checked,
    nesting_exceeds,
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,  # unclosed: json.loads would recurse into it
    nested(100_000),  # closed, past orjson's own cap
    nested(MAX_JSON_DEPTH + 1),
    b'{"a":' * 70 + b"1" + b"}" * 70,
    b'{"x": "\\u0000"}' + b"[" * 200,  # invalid and deep: refused, never parsed by json
])
def test_deep_json_is_refused_without_recursion(raw: bytes) -> None:
    with pytest.raises(InvalidInput) as refused:
        loads_checked(raw)
    assert status_of(refused.value) == 400
    assert isinstance(refused.value, TooDeep | NotJson)


def test_the_limit_itself_is_accepted_and_brackets_in_strings_do_not_count() -> None:
    assert loads_checked(nested(MAX_JSON_DEPTH)) is not None
    assert loads_checked(json.dumps({"text": "[" * 10_000}).encode()) == {"text": "[" * 10_000}
    assert not nesting_exceeds(json.dumps(["[{" * 500]).encode(), MAX_JSON_DEPTH)


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"messages": [{"role": "user", "content": "hi\\u0000there"}]}', "messages[0].content"),
    (b'{"metadata": {"x": "\\ud800"}}', "metadata.x"),  # lone surrogate: not encodable to UTF-8
    (b'{"metadata": {"x": "ok", "y": ["a", "\\udfff"]}}', "metadata.y[1]"),
    (b'{"prompt": "raw\x00nul"}', "prompt"),  # a raw NUL byte inside a string
    (b'"\\u0000"', None),
])
def test_unstorable_strings_are_named_by_their_dotted_path(raw: bytes, param: str | None) -> None:
    with pytest.raises(Unstorable) as refused:
        loads_checked(raw)
    assert refused.value.param == param
    assert status_of(refused.value) == 400


def test_a_nul_in_a_key_names_the_key_escaped() -> None:
    with pytest.raises(Unstorable) as refused:
        loads_checked(b'{"metadata": {"a\\u0000b": 1}}')
    assert refused.value.param == "metadata.a\\x00b"
    assert "\x00" not in refused.value.message


def test_ordinary_bodies_parse_as_json_does() -> None:
    body = {"model": "smart-select", "messages": [{"role": "user", "content": "héllo ☃ \\u0000 as text"}],
            "metadata": {"k": "v"}, "n": 1, "t": 0.5, "flag": None}
    raw = json.dumps(body).encode()
    assert loads_checked(raw) == json.loads(raw)
    # numbers orjson does not read (NaN, beyond 64 bits) still parse as json reads them
    assert loads_checked(b'{"n": 123456789012345678901234567890}')["n"] == pytest.approx(1.2345678901234568e29)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b"\x00", b"nul"])
def test_not_json_is_not_json(raw: bytes) -> None:
    with pytest.raises(NotJson):
        loads_checked(raw)


def test_check_text_names_the_parameter() -> None:
    check_text("fine", "status")
    with pytest.raises(Unstorable) as refused:
        check_text("a\x00", "status")
    assert refused.value.param == "status"
