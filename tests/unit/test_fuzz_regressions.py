"""Inputs the fuzz suite found answered with a 500, now refused (or accepted) cleanly: deadlines with any RFC 3339
offset are stored in UTC and ones past the representable range are refused; a chat message whose role is not a
string, or a content part whose text is not a string, is a 422 naming it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tierbatch.api.errors import status_of
from tierbatch.base.errors import InvalidInput
from tierbatch.jobs.requests import parse_job_request
from tierbatch.tasks.submission import parse_submission


@pytest.mark.parametrize(("given", "instant"), [
    ("3298-09-05T18:47:32+16:17", datetime(3298, 9, 5, 2, 30, 32, tzinfo=UTC)),
    ("2030-01-01T00:00:00-23:59", datetime(2030, 1, 1, 23, 59, tzinfo=UTC)),
    ("2030-01-01T12:00:00+02:00", datetime(2030, 1, 1, 10, 0, tzinfo=UTC)),
])
def test_any_offset_becomes_the_same_instant_in_utc(given: str, instant: datetime) -> None:
    task = parse_submission({"prompt": "hi", "deadline": given}, 10, 10_000)[0]
    job = parse_job_request({"items": [{"id": "1", "text": "x"}], "deadline": given}, 10_000)
    for parsed in (task.deadline, job.settings.deadline):
        assert parsed == instant and parsed is not None and parsed.utcoffset() == timedelta(0)


def test_a_deadline_past_the_last_instant_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_submission({"prompt": "hi", "deadline": "9999-12-31T23:00:00-05:00"}, 10, 10_000)
    assert caught.value.param == "deadline"


@pytest.mark.parametrize("role", [{"a": 1}, ["user"], 3, None])
def test_a_message_role_that_is_not_a_string_is_refused_by_name(role: object) -> None:
    items = [{"id": "1", "messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]}]
    with pytest.raises(InvalidInput) as caught:
        parse_job_request({"items": items}, 10_000)
    assert caught.value.param == "items[0].messages[1].role"
    assert status_of(caught.value) == 422


@pytest.mark.parametrize(("content", "where"), [
    ([{"type": "text", "text": -35007}], "[0].text"),
    ([{"type": "text", "text": "ok"}, {"type": "text", "text": {"a": 1}}], "[1].text"),
    (["plain string part"], "[0]"),
])
def test_a_content_part_whose_text_is_not_a_string_is_refused(content: object, where: str) -> None:
    with pytest.raises(InvalidInput) as task_error:
        parse_submission({"messages": [{"role": "user", "content": content}]}, 10, 10_000)
    assert status_of(task_error.value) == 422
    assert task_error.value.param == "messages[0].content" and where in task_error.value.message
    items = [{"id": "1", "messages": [{"role": "user", "content": content}]}]
    with pytest.raises(InvalidInput) as job_error:
        parse_job_request({"items": items}, 10_000)
    assert status_of(job_error.value) == 422 and job_error.value.param == f"items[0].messages[0].content{where}"


def test_text_and_other_parts_are_still_accepted() -> None:
    content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]
    task = parse_submission({"messages": [{"role": "user", "content": content}]}, 10, 10_000)[0]
    assert task.chat_messages() == [{"role": "user", "content": content}]
    parse_job_request({"items": [{"id": "1", "messages": [{"role": "user", "content": content}]}]}, 10_000)
