"""Pure parts of the provider batch listing: line outcomes from grouped task counts, the cursor, the wire
shape, and the command line's paging over `next`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tierbatch.api.routes.provider_batches import provider_batch_body
from tierbatch.base.errors import InvalidInput
from tierbatch.base.states import BatchStatus, Mode, ProviderBatchStatus, TaskStatus
from tierbatch.batching.read import LineCounts, LineGroup, ProviderBatchView, count_lines, parse_cursor
from tierbatch.cli.batches import ListOptions, fetch_batches


def test_lines_are_counted_by_where_their_tasks_are_now() -> None:
    groups = [LineGroup(TaskStatus.SUCCEEDED, Mode.BATCH, 7), LineGroup(TaskStatus.FAILED, Mode.BATCH, 2),
              LineGroup(TaskStatus.IN_BATCH, Mode.BATCH, 3),
              # taken out of the batch for an immediate call, then served, still running, or served from cache
              LineGroup(TaskStatus.SUCCEEDED, Mode.IMMEDIATE, 1), LineGroup(TaskStatus.RUNNING, Mode.IMMEDIATE, 1),
              LineGroup(TaskStatus.SUCCEEDED, Mode.CACHE, 1)]
    counts = count_lines(groups, sent=20)
    assert counts == LineCounts(succeeded=7, failed=2, pending=3, escalated=3, retried=5)
    assert counts.attributed == 15


def test_retried_lines_are_unknown_without_the_number_sent() -> None:
    counts = count_lines([LineGroup(TaskStatus.SUCCEEDED, Mode.BATCH, 4)], sent=None)
    assert counts.retried is None and counts.succeeded == 4


def test_a_batch_whose_lines_all_left_it_counts_them_all_as_retried() -> None:
    assert count_lines([], sent=6) == LineCounts(retried=6)
    # never negative, even if the stored count were behind the tasks
    assert count_lines([LineGroup(TaskStatus.IN_BATCH, Mode.BATCH, 3)], sent=2).retried == 0


def test_the_cursor_is_a_batch_id_and_garbage_names_after() -> None:
    batch_id = uuid.uuid4()
    assert parse_cursor(str(batch_id)) == batch_id
    for garbage in ("", "not-a-cursor", "1' OR '1'='1", "x" * 10_000):
        with pytest.raises(InvalidInput) as refused:
            parse_cursor(garbage)
        assert refused.value.param == "after"
        assert len(refused.value.message) < 200  # a huge value is not echoed back whole


def _view(**changes: Any) -> ProviderBatchView:
    submitted = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    values: dict[str, Any] = dict(
        id=uuid.uuid4(), provider="sim", model="gpt-4o-mini", provider_batch_id="batch_1", status=BatchStatus.DONE,
        provider_status=ProviderBatchStatus.COMPLETED, request_count=4, line_counts=LineCounts(3, 1, 0, 0, 0),
        created_at=submitted - timedelta(seconds=2), submitted_at=submitted,
        completed_at=submitted + timedelta(seconds=90, milliseconds=500),
        ingested_at=submitted + timedelta(seconds=95), error=None)
    values.update(changes)
    return ProviderBatchView(**values)


def test_the_wire_shape_has_every_field_and_the_turnaround() -> None:
    view = _view()
    body = provider_batch_body(view)
    assert body == {
        "id": str(view.id), "object": "provider_batch", "provider": "sim", "model": "gpt-4o-mini",
        "provider_batch_id": "batch_1", "status": "done", "provider_status": "completed", "request_count": 4,
        "line_counts": {"succeeded": 3, "failed": 1, "pending": 0, "escalated": 0, "retried": 0},
        "created_at": "2026-01-01T11:59:58+00:00", "submitted_at": "2026-01-01T12:00:00+00:00",
        "completed_at": "2026-01-01T12:01:30.500000+00:00", "ingested_at": "2026-01-01T12:01:35+00:00",
        "turnaround_seconds": 90.5, "error": None,
    }


def test_turnaround_is_null_until_the_provider_finished() -> None:
    assert _view(completed_at=None, ingested_at=None).turnaround_seconds is None
    body = provider_batch_body(_view(status=BatchStatus.PREPARING, provider_status=None, provider_batch_id=None,
                                     submitted_at=None, completed_at=None, ingested_at=None))
    assert body["turnaround_seconds"] is None and body["provider_status"] is None


def _pages(rows: list[dict[str, Any]], seen: list[dict[str, str]]) -> httpx.MockTransport:
    """An API holding `rows` (newest first) that answers pages like the real one, recording each query."""

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        start = 0
        if "after" in params:
            start = next(i for i, row in enumerate(rows) if row["id"] == params["after"]) + 1
        page = rows[start:start + int(params["limit"])]
        more = start + len(page) < len(rows)
        return httpx.Response(200, json={"object": "list", "data": page, "has_more": more,
                                         "next": page[-1]["id"] if more else None})

    return httpx.MockTransport(handler)


def _options(limit: int, status: str | None = None) -> ListOptions:
    return ListOptions(status=status, provider=None, model="m", tenant_id=None, limit=limit, as_json=True,
                       api_url="http://api", api_key="k")


def test_the_command_line_follows_next_until_its_limit() -> None:
    rows = [{"id": f"b{i}"} for i in range(2500)]
    seen: list[dict[str, str]] = []
    with httpx.Client(transport=_pages(rows, seen), base_url="http://api") as client:
        got, more = fetch_batches(client, _options(2100, status="done"))
    assert [row["id"] for row in got] == [f"b{i}" for i in range(2100)]
    assert more is True
    assert [q.get("after") for q in seen] == [None, "b999", "b1999"]
    assert [q["limit"] for q in seen] == ["1000", "1000", "100"]
    assert all(q["status"] == "done" and q["model"] == "m" and "provider" not in q for q in seen)


def test_the_command_line_stops_at_the_last_page() -> None:
    rows = [{"id": f"b{i}"} for i in range(3)]
    seen: list[dict[str, str]] = []
    with httpx.Client(transport=_pages(rows, seen), base_url="http://api") as client:
        got, more = fetch_batches(client, _options(50))
    assert (len(got), more, len(seen)) == (3, False, 1)
    # exactly as many as asked, none left: not "more"
    seen.clear()
    with httpx.Client(transport=_pages(rows, seen), base_url="http://api") as client:
        got, more = fetch_batches(client, _options(3))
    assert (len(got), more) == (3, False)
