"""Helpers of the quality monitor's tests."""

from __future__ import annotations

from typing import Any

import httpx


def quality_row(client: httpx.Client, task_type: str) -> dict[str, Any]:
    """The task type's row of `GET /v1/quality` (fails the test when there is none)."""
    body = client.get("/v1/quality").json()
    rows = [r for r in body["data"] if r["task_type"] == task_type]
    assert rows, body
    return dict(rows[0])
