"""Celery task of retention; the rule is in tierbatch/tasks/retention.py.

`tierbatch.retention.tick` (beat, every `[retention] interval_seconds`, only when `bodies_days` is set):
batches of `batch_size` tasks, one transaction each, until none is due or `tick_budget_seconds` is spent
(the next tick goes on); then the cached answers stored before the same cutoff. Rows are locked with SKIP
LOCKED and guarded by `bodies_removed_at`, so two ticks at once remove each body once.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from celery import Task as CeleryTask
from celery import shared_task

from tierbatch.base.messaging import RETENTION_TICK
from tierbatch.cache.responses import purge_entries_created_before
from tierbatch.metrics.catalog import RETENTION_BODIES_REMOVED, RemovedKind
from tierbatch.tasks.retention import remove_bodies
from tierbatch.worker.context import WorkerContext, context_of

log = logging.getLogger(__name__)


def run_retention(ctx: WorkerContext, now: datetime | None = None) -> tuple[int, int]:
    """One tick: (task bodies removed, cache entries deleted)."""
    retention = ctx.config.retention
    if retention.bodies_days is None:
        return 0, 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention.bodies_days)
    deadline = time.monotonic() + retention.tick_budget_seconds
    tasks = 0
    while time.monotonic() < deadline:
        with ctx.sessions.begin() as session:
            removed = remove_bodies(session, cutoff, retention.batch_size)
        tasks += removed
        if removed < retention.batch_size:
            break
    entries = 0
    while time.monotonic() < deadline:
        with ctx.sessions.begin() as session:
            deleted = purge_entries_created_before(session, cutoff, retention.batch_size)
        entries += deleted
        if deleted < retention.batch_size:
            break
    if entries:
        RETENTION_BODIES_REMOVED.labels(RemovedKind.CACHE_ENTRY).inc(entries)  # committed above
    if tasks or entries:
        log.info("retention: removed the bodies of %d tasks and %d cached answers finished before %s",
                 tasks, entries, cutoff.isoformat())
    return tasks, entries


@shared_task(name=RETENTION_TICK, bind=True)
def retention_tick(self: CeleryTask) -> int:
    """Remove the bodies that are due; the number of tasks emptied in this run."""
    return run_retention(context_of(self.app))[0]
