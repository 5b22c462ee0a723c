"""Batch records: their state, their OpenAI representation, and the in-memory store with paging."""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tierbatch.simulator.batch_output import BatchResults

COMPLETION_WINDOW_SECONDS = 24 * 3600
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
ENQUEUED = frozenset({"in_progress", "finalizing", "cancelling"})
_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "cancelling_at", "cancelled_at")


@dataclass
class BatchRecord:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    expires_at: int
    line_count: int
    status: str = "validating"
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    timestamps: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] | None = None
    enqueued_tokens: int = 0
    results: BatchResults | None = None
    progress_started: float | None = None  # monotonic time in_progress began
    progress_seconds: float = 0.0
    cancel_requested_at: float | None = None  # monotonic time of the cancel request
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)

    def stamp(self, status: str) -> None:
        self.status = status
        key = f"{status}_at"
        if key in _TIMESTAMPS:
            self.timestamps[key] = int(time.time())

    def done_count(self, now: float | None = None) -> int:
        """Requests answered so far: in_progress advances evenly over its duration."""
        if self.results is None or self.progress_started is None:
            return 0
        total = len(self.results.lines)
        if now is None:
            now = time.monotonic()
        if self.cancel_requested_at is not None:
            now = min(now, self.cancel_requested_at)
        if self.progress_seconds <= 0:
            return total
        share = max(0.0, (now - self.progress_started) / self.progress_seconds)
        return min(total, int(total * share))

    def live_counts(self) -> tuple[int, int, int]:
        if self.status in ("in_progress", "cancelling") and self.results is not None:
            done = self.done_count()
            failed = self.results.failed_before[done]
            return self.total, done - failed, failed
        return self.total, self.completed, self.failed

    def as_dict(self) -> dict[str, Any]:
        total, completed, failed = self.live_counts()
        out: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": self.metadata,
        }
        if self.model is not None:
            out["model"] = self.model
        if self.errors:
            out["errors"] = {"object": "list", "data": self.errors}
        out.update(self.timestamps)
        if self.output_file_id is not None:
            out["output_file_id"] = self.output_file_id
        if self.error_file_id is not None:
            out["error_file_id"] = self.error_file_id
        if self.usage is not None:
            out["usage"] = self.usage
        return out


class BatchStore:
    def __init__(self) -> None:
        self._batches: dict[str, BatchRecord] = {}
        self._order: list[str] = []  # creation order, oldest first

    def new_id(self) -> str:
        return "batch_" + os.urandom(12).hex()

    def create(self, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict[str, str] | None, line_count: int) -> BatchRecord:
        now = int(time.time())
        batch = BatchRecord(
            id=self.new_id(), input_file_id=input_file_id, endpoint=endpoint,
            completion_window=completion_window, metadata=metadata, created_at=now,
            expires_at=now + COMPLETION_WINDOW_SECONDS, line_count=line_count,
        )
        self._batches[batch.id] = batch
        self._order.append(batch.id)
        return batch

    def get(self, batch_id: str) -> BatchRecord | None:
        return self._batches.get(batch_id)

    def page(self, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """Newest first, starting after the batch `after` (KeyError if unknown)."""
        end = len(self._order)
        if after is not None:
            if after not in self._batches:
                raise KeyError(after)
            end = self._position(after)
        start = max(0, end - limit)
        ids = self._order[start:end]
        return [self._batches[i] for i in reversed(ids)], start > 0

    def _position(self, batch_id: str) -> int:
        created = self._batches[batch_id].created_at
        lo = bisect.bisect_left(self._order, created, key=lambda i: self._batches[i].created_at)
        for pos in range(lo, len(self._order)):
            if self._order[pos] == batch_id:
                return pos
        return self._order.index(batch_id)

    def count_by_status(self) -> dict[str, int]:
        return dict(Counter(b.status for b in self._batches.values()))

    def enqueued_tokens(self, model: str) -> int:
        return sum(b.enqueued_tokens for b in self._batches.values()
                   if b.model == model and b.status in ENQUEUED)
