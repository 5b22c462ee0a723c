"""A provider batch's end, counted: its status, and for a done batch the time from submission to the end."""

from __future__ import annotations

from datetime import datetime

from tierbatch.base.states import BatchStatus
from tierbatch.metrics.catalog import BATCH_TURNAROUND, BATCHES_FINISHED


def count_finished_batch(status: BatchStatus, provider: str, model: str, submitted_at: datetime | None,
                         finished_at: datetime | None) -> None:
    BATCHES_FINISHED.labels(provider, model, str(status)).inc()
    # a batch that never reached the provider (failed while preparing) has no turnaround
    if status is BatchStatus.DONE and submitted_at is not None and finished_at is not None:
        BATCH_TURNAROUND.labels(provider, model).observe(max(0.0, (finished_at - submitted_at).total_seconds()))
