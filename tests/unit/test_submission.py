from __future__ import annotations

import pytest

from tierbatch.api.errors import status_of
from tierbatch.base.errors import InvalidInput
from tierbatch.tasks.submission import parse_submission


def test_prompt_becomes_a_user_message_and_params_pass_through() -> None:
    [spec] = parse_submission({"prompt": "hi", "params": {"temperature": 0, "seed": 3}}, 1000, 1 << 20)
    assert spec.provider_request() == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                                       "seed": 3}


@pytest.mark.parametrize(("payload", "param"), [
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"prompt": "a", "urgent": "maybe"}, "urgent"),
    ({"tasks": [{"prompt": "a"}, {"prompt": "b", "params": {"logit_bias": {}}}]}, "tasks[1].params.logit_bias"),
    ([1, 2], None),
])
def test_errors_name_the_field(payload: object, param: str | None) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_submission(payload, 1000, 1 << 20)
    assert caught.value.param == param
    if param:
        assert param in caught.value.message


def test_size_limits() -> None:
    with pytest.raises(InvalidInput) as too_many:
        parse_submission({"tasks": [{"prompt": "a"}] * 3}, 2, 1 << 20)
    assert status_of(too_many.value) == 413
    with pytest.raises(InvalidInput) as too_big:
        parse_submission({"tasks": [{"prompt": "a"}, {"prompt": "x" * 200}]}, 10, 100)
    assert too_big.value.param == "tasks[1].prompt"
