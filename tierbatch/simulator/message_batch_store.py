"""Message batches (Anthropic's `/v1/messages/batches`): their records, their representation and the store.

`processing_status` is `in_progress`, `canceling` or `ended`; `request_counts` keeps every request under
`processing` until the batch ends, then tallies them as succeeded, errored, canceled or expired (the
sum is always the number of requests), as Anthropic does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

RESULT_KINDS = ("succeeded", "errored", "canceled", "expired")
EXPIRES_AFTER_SECONDS = 24 * 3600


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    params: Any  # checked when the batch is processed: a bad one ends as an errored result


@dataclass
class MessageBatchRecord:
    id: str
    requests: list[BatchRequest]
    created_at: float = field(default_factory=time.time)
    processing_status: str = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: Counter[str] = field(default_factory=Counter)  # result kinds, once ended
    results: bytes | None = None  # the results JSONL, once ended
    processing_started: float = field(default_factory=time.monotonic)
    processing_seconds: float = 0.0
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)

    def progress_share(self) -> float:
        """The share of requests processed so far (processing advances evenly over its duration)."""
        if self.processing_seconds <= 0:
            return 1.0
        return min(1.0, max(0.0, (time.monotonic() - self.processing_started) / self.processing_seconds))

    def request_counts(self) -> dict[str, int]:
        if self.processing_status != "ended":
            return {"processing": len(self.requests), **{kind: 0 for kind in RESULT_KINDS}}
        return {"processing": 0, **{kind: self.counts[kind] for kind in RESULT_KINDS}}

    def as_dict(self, base_url: str) -> dict[str, Any]:
        results_url = None
        if self.processing_status == "ended":
            results_url = f"{base_url.rstrip('/')}/v1/messages/batches/{self.id}/results"
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.processing_status,
            "request_counts": self.request_counts(),
            "ended_at": rfc3339(self.ended_at),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + EXPIRES_AFTER_SECONDS),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at),
            "results_url": results_url,
        }


class MessageBatchStore:
    def __init__(self) -> None:
        self._batches: dict[str, MessageBatchRecord] = {}
        self._order: list[str] = []  # creation order, oldest first

    def create(self, requests: list[BatchRequest]) -> MessageBatchRecord:
        batch = MessageBatchRecord(id="msgbatch_" + os.urandom(12).hex(), requests=requests)
        self._batches[batch.id] = batch
        self._order.append(batch.id)
        return batch

    def get(self, batch_id: str) -> MessageBatchRecord | None:
        return self._batches.get(batch_id)

    def delete(self, batch_id: str) -> None:
        del self._batches[batch_id]
        self._order.remove(batch_id)

    def page(self, after_id: str | None, before_id: str | None,
             limit: int) -> tuple[list[MessageBatchRecord], bool]:
        """Newest first: the `limit` batches just older than `after_id`, or just newer than `before_id`
        (KeyError for an unknown id), and whether more lie beyond them in that direction."""
        newest_first = self._order[::-1]
        if after_id is not None:
            start = newest_first.index(after_id) + 1 if after_id in self._batches else _unknown(after_id)
            ids = newest_first[start:start + limit]
            more = start + limit < len(newest_first)
        elif before_id is not None:
            end = newest_first.index(before_id) if before_id in self._batches else _unknown(before_id)
            ids = newest_first[max(0, end - limit):end]
            more = end - limit > 0
        else:
            ids = newest_first[:limit]
            more = limit < len(newest_first)
        return [self._batches[i] for i in ids], more

    def count_by_status(self) -> dict[str, int]:
        return dict(Counter(b.processing_status for b in self._batches.values()))


def _unknown(batch_id: str) -> int:
    raise KeyError(batch_id)
