"""Celery tasks of retention; the rules are in tierbatch/tasks/retention.py and tierbatch/tasks/partitions.py.

`tierbatch.retention.tick` (beat, every `[retention] interval_seconds`, only when `bodies_days` is set):
batches of `batch_size` tasks, one transaction each, until none is due or `tick_budget_seconds` is spent
(the next tick goes on); then the cached answers stored before the same cutoff. Rows are locked with SKIP
LOCKED and guarded by `bodies_removed_at`, so two ticks at once remove each body once.

`tierbatch.retention.partitions` (beat, every `interval_seconds`, always): the monthly partitions ahead,
and with `tasks_days` at most one old month of tasks dropped, its cleaning in batches of `batch_size`
within `tick_budget_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from celery import Task as CeleryTask
from celery import shared_task
from sqlalchemy.orm import Session

from tierbatch.base.messaging import PARTITIONS_TICK, RETENTION_TICK
from tierbatch.cache.responses import purge_entries_created_before
from tierbatch.metrics.catalog import RETENTION_BODIES_REMOVED, RemovedKind
from tierbatch.tasks.partitions import Upkeep, run_upkeep
from tierbatch.tasks.retention import remove_bodies
from tierbatch.worker.context import WorkerContext, context_of

log = logging.getLogger(__name__)


def _in_batches(ctx: WorkerContext, step: Callable[[Session, int], int], batch_size: int, deadline: float) -> int:
    """`step` in one transaction per batch until a batch comes back short or the deadline passes."""
    done = 0
    while time.monotonic() < deadline:
        with ctx.sessions.begin() as session:
            moved = step(session, batch_size)
        done += moved
        if moved < batch_size:
            break
    return done


def run_retention(ctx: WorkerContext, now: datetime | None = None) -> tuple[int, int]:
    """One tick: (task bodies removed, cache entries deleted)."""
    retention = ctx.config.retention
    if retention.bodies_days is None:
        return 0, 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention.bodies_days)
    deadline = time.monotonic() + retention.tick_budget_seconds
    tasks = _in_batches(ctx, lambda session, limit: remove_bodies(session, cutoff, limit),
                        retention.batch_size, deadline)
    entries = _in_batches(ctx, lambda session, limit: purge_entries_created_before(session, cutoff, limit),
                          retention.batch_size, deadline)
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


def run_partitions(ctx: WorkerContext, now: datetime | None = None) -> Upkeep:
    """One upkeep of the monthly partitions (tierbatch/tasks/partitions.py)."""
    retention = ctx.config.retention
    upkeep = run_upkeep(ctx.engine, now or datetime.now(UTC), tasks_days=retention.tasks_days,
                        batch_size=retention.batch_size, budget_seconds=retention.tick_budget_seconds)
    if upkeep.created or upkeep.dropped:
        log.info("partitions: created %s (%d rows moved out of the default), dropped %s, %d referring rows cleaned",
                 ", ".join(upkeep.created) or "none", upkeep.moved, ", ".join(upkeep.dropped) or "none",
                 upkeep.cleaned)
    return upkeep


@shared_task(name=PARTITIONS_TICK, bind=True)
def partitions_tick(self: CeleryTask) -> int:
    """Keep the partitions ahead, drop an old month when due; the number of partitions created and dropped."""
    upkeep = run_partitions(context_of(self.app))
    return len(upkeep.created) + len(upkeep.dropped)
