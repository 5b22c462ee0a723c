"""OpenAI's chat request checks shared by the gateway and the simulator (`tierbatch.providers.openai_validation`)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tierbatch.providers import openai_validation as shared
from tierbatch.providers.openai_validation import (
    InvalidRequest,
    check_messages,
    check_model,
    check_request_object,
    check_response_format,
    check_stream,
    invalid_type,
    missing,
    type_name,
)

ROLES = ("system", "user", "assistant")
HI = [{"role": "user", "content": "hi"}]


def refusal(check: Any, *args: Any, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check(*args, **kwargs)
    return caught.value


@pytest.mark.parametrize(("value", "name"), [
    (None, "null"), (True, "a boolean"), (3, "a number"), (2.5, "a number"), ("x", "a string"), ([], "an array"),
    ({}, "an object"),
])
def test_type_names_are_openais(value: Any, name: str) -> None:
    assert type_name(value) == name


def test_invalid_request_carries_message_param_and_code() -> None:
    error = InvalidRequest("nope")
    assert (error.message, error.param, error.code, str(error)) == ("nope", None, None, "nope")
    error = invalid_type("temperature", "a number", "hot")
    assert error.message == "Invalid type for 'temperature': expected a number, but got a string instead."
    assert (error.param, error.code) == ("temperature", "invalid_type")
    error = missing("messages")
    assert (error.message, error.param, error.code) == ("Missing required parameter: 'messages'.", "messages",
                                                       "missing_required_parameter")


def test_request_body_must_be_an_object() -> None:
    body = {"model": "m"}
    assert check_request_object(body) is body
    error = refusal(check_request_object, [1, 2])
    assert error.message == "Invalid type for request body: expected an object, but got an array instead."
    assert (error.param, error.code) == (None, "invalid_type")


def test_model_missing_is_named_only_when_asked() -> None:
    assert check_model({"model": "gpt-4o"}, name_missing=False) == "gpt-4o"
    for body in ({}, {"model": ""}, {"model": None}):
        plain = refusal(check_model, body, name_missing=False)
        named = refusal(check_model, body, name_missing=True)
        assert plain.message == named.message == "you must provide a model parameter"
        assert (plain.param, plain.code) == (None, None)
        assert (named.param, named.code) == ("model", "missing_required_parameter")
    assert (refusal(check_model, {"model": 5}, name_missing=True).code) == "invalid_type"


@pytest.mark.parametrize(("messages", "param", "code"), [
    (None, "messages", "missing_required_parameter"),
    ("hello", "messages", "invalid_type"),
    ([], "messages", "empty_array"),
    ([HI[0], "x"], "messages[1]", "invalid_type"),
    ([{"content": "x"}], "messages[0].role", "missing_required_parameter"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "invalid_value"),
    ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
    ([{"role": "user", "content": 7}], "messages[0].content", "invalid_type"),
])
def test_bad_messages(messages: Any, param: str, code: str) -> None:
    error = refusal(check_messages, messages, roles=ROLES)
    assert (error.param, error.code) == (param, code)


def test_messages_that_pass_and_the_role_list_order() -> None:
    check_messages(HI, roles=ROLES)
    check_messages([{"role": "assistant"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}], roles=ROLES)
    error = refusal(check_messages, [{"role": "robot", "content": "x"}], roles=("user", "system"))
    assert error.message == "Invalid value: 'robot'. Supported values are: 'user', 'system'."
    # a role outside `roles` is refused even where the other side would take it
    assert refusal(check_messages, [{"role": "tool", "content": "x"}], roles=ROLES).code == "invalid_value"


def test_stream_is_a_boolean() -> None:
    assert check_stream({}) is False
    assert check_stream({"stream": True}) is True
    assert check_stream({"stream": False}) is False
    error = refusal(check_stream, {"stream": "yes"})
    assert (error.param, error.code) == ("stream", "invalid_type")


@pytest.mark.parametrize("typed", [False, True])
def test_response_format_checks_both_sides_share(typed: bool) -> None:
    for good in (None, {"type": "text"}, {"type": "json_object"},
                 {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}):
        check_response_format(good, typed_json_schema=typed)
    cases: list[tuple[Any, str, str]] = [
        ("json", "response_format", "invalid_type"),
        ({}, "response_format.type", "missing_required_parameter"),
        ({"type": "xml"}, "response_format.type", "invalid_value"),
        ({"type": "json_schema"}, "response_format.json_schema", "missing_required_parameter"),
        ({"type": "json_schema", "json_schema": {}}, "response_format.json_schema.name",
         "missing_required_parameter"),
    ]
    for value, param, code in cases:
        error = refusal(check_response_format, value, typed_json_schema=typed)
        assert (error.param, error.code) == (param, code), value
    assert refusal(check_response_format, {"type": "xml"}, typed_json_schema=typed).message == (
        "Invalid value: 'xml'. Supported values are: 'text', 'json_object', and 'json_schema'.")


def test_response_format_json_schema_types_only_when_typed() -> None:
    not_an_object = {"type": "json_schema", "json_schema": "s"}
    assert refusal(check_response_format, not_an_object, typed_json_schema=False).code == "missing_required_parameter"
    error = refusal(check_response_format, not_an_object, typed_json_schema=True)
    assert (error.param, error.code) == ("response_format.json_schema", "invalid_type")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}
    check_response_format(bad_schema, typed_json_schema=False)
    error = refusal(check_response_format, bad_schema, typed_json_schema=True)
    assert (error.param, error.code) == ("response_format.json_schema.schema", "invalid_type")


def test_shared_module_and_simulator_stay_light() -> None:
    """The module needs only the standard library, and the simulator reaches no other domain module through it."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import tierbatch.providers.openai_validation\n"
        "first = sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names)\n"
        "import tierbatch.simulator.app\n"
        "domain = sorted(m for m in sys.modules if m.startswith('tierbatch.')\n"
        "                and m.split('.')[1] not in ('simulator', 'api', 'worker', 'cli'))\n"
        "print(json.dumps([first, domain]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    first, domain = json.loads(out)
    assert first == ["tierbatch", "tierbatch.providers", "tierbatch.providers.openai_validation"]
    assert domain == ["tierbatch.providers", "tierbatch.providers.openai_validation"]


def test_batch_metadata() -> None:
    assert shared.check_batch_metadata(None) is None
    assert shared.check_batch_metadata({"team": "billing"}) == {"team": "billing"}
    cases: list[tuple[Any, str, str]] = [
        ([], "metadata", "invalid_type"),
        ({f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties"),
        ({"k" * 65: "v"}, "metadata", "invalid_value"),
        ({"team": 3}, "metadata.team", "invalid_type"),
        ({"team": "x" * 513}, "metadata.team", "string_above_max_length"),
    ]
    for metadata, param, code in cases:
        with pytest.raises(shared.InvalidRequest) as refused:
            shared.check_batch_metadata(metadata)
        assert (refused.value.param, refused.value.code) == (param, code)
    with pytest.raises(shared.InvalidRequest) as long_key:
        shared.check_batch_metadata({"k" * 65: "v"}, ellipsis="...")
    assert "kkkkkkkkkkkkkkkkkkkk...'" in long_key.value.message
