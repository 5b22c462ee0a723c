"""Beat's scheduler: Celery's persistent one, counting each tick it sends (`tierbatch_beat_ticks_total`), so
a dashboard sees beat stop. Entry names are the schedule's own (tierbatch.worker.app.beat_schedule)."""

from __future__ import annotations

from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry

from tierbatch.metrics.catalog import BEAT_TICKS


class CountingScheduler(PersistentScheduler):
    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        super().apply_entry(entry, producer=producer)
        BEAT_TICKS.labels(entry.name).inc()
