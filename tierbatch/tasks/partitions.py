"""The monthly partitions over time: kept ahead of the clock, and with `[retention] tasks_days`, old
months of tasks dropped whole, their ledger rows kept. The DDL is tierbatch/db/partitions.py's.

One upkeep (`run_upkeep`, the beat's `tierbatch.retention.partitions` tick) does, each step in its own
short transaction under `lock_timeout` (a step that cannot get its lock in time gives up; the next tick
tries again, so the hot path never waits long behind it):

1. Ahead: `tasks` and `ledger_entries` get the partitions of this month and the next MONTHS_AHEAD, the
   rows of their range moved out of the DEFAULT first (and a past month whose rows are in the DEFAULT
   because the beat was down for longer than that gets its partition too).
2. With `tasks_days`: at most one month of `tasks` is dropped per tick, the oldest whose whole range is
   older than `tasks_days` and that holds no live task (a live one keeps its month, checked again under
   the drop's exclusive lock, so a task cannot go live in between). Its ledger partition stays: every
   ledger row, `ledger_daily` and the cost figures stay as they were. Before the drop, the month's job
   item ids are written to a marker table `tasks_YYYY_MM_dropped`; after it, in bounded batches (over
   as many ticks as it takes), what referred to the dropped tasks is cleaned and the marker dropped:
   `classifications.task_id` and `quality_comparisons.task_id` become NULL (a schedule run's labels and
   costs, and the quality window and history, stay), the idempotency keys of the month's tasks are
   deleted (the key may be used again), and its item ids are given back to their jobs. Until then an
   item id stays taken and a key names a task that is gone (a request with that key makes a new task:
   tierbatch/tasks/store.py). A month dropped before a crash is found again by its marker. Only monthly
   partitions are dropped: the tasks with random ids written before migration 0016 that the DEFAULT and
   `tasks_from_2100` hold are kept.

Every step's transaction first takes the upkeep's advisory lock (transaction-level, so a pooler in
transaction mode cannot leave it held); a step that finds it taken ends its upkeep at once (`skipped`),
and each step checks again under that lock what an earlier read decided.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from tierbatch.base.ids import Month
from tierbatch.base.states import LIVE_TASK_STATUSES, sql_in
from tierbatch.db.locks import try_transaction_lock
from tierbatch.db.partitions import (
    DROPPED_SUFFIX,
    PARTITIONED,
    Partition,
    create_month_partition,
    default_partition,
    drop_partition,
    dropped_marker,
    lock_exclusively,
    month_partition,
    partitions,
)
from tierbatch.metrics.catalog import PARTITIONS, PartitionAction

log = logging.getLogger(__name__)

MONTHS_AHEAD = 3
# how long a step waits for a lock before it gives up until the next tick; while it waits, the queries
# queued behind its lock wait too
LOCK_TIMEOUT_MS = 500
# the key of the advisory lock every step's transaction takes: hashtextextended(UPKEEP_LOCK, 0)
UPKEEP_LOCK = "tierbatch.partitions"


@dataclass
class Upkeep:
    """What one upkeep did."""

    created: list[str] = field(default_factory=list)
    moved: int = 0  # rows moved out of a DEFAULT partition into a new month's
    dropped: list[str] = field(default_factory=list)
    cleaned: int = 0  # rows that referred to dropped tasks, cleared or deleted
    skipped: bool = False  # another upkeep held the lock


def covered(existing: list[Partition], month: Month) -> bool:
    """Whether a partition other than the DEFAULT holds any id of `month`."""
    lower, upper = month.bound, month.plus(1).bound
    return any(not p.is_default and (p.lower is None or p.lower < upper) and (p.upper is None or lower < p.upper)
               for p in existing)


class UpkeepBusy(Exception):
    """Another upkeep holds the lock a step needs: this one ends."""


@contextlib.contextmanager
def _step(connection: Connection) -> Iterator[None]:
    """One step's transaction: the upkeep's lock first, then `lock_timeout` for what the step locks."""
    with connection.begin():
        if not try_transaction_lock(connection, UPKEEP_LOCK):
            raise UpkeepBusy
        connection.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
        yield


def _lock_refused(exc: OperationalError) -> bool:
    return isinstance(exc.orig, psycopg.errors.LockNotAvailable)


def _default_holds(connection: Connection, parent: str, month: Month) -> bool:
    key = PARTITIONED[parent]
    return bool(connection.scalar(text(
        f"SELECT EXISTS (SELECT 1 FROM {default_partition(parent)} WHERE {key} >= :lower AND {key} < :upper)"),
        {"lower": month.bound, "upper": month.plus(1).bound}))


def months_wanted(connection: Connection, parent: str, now: datetime, months: int = MONTHS_AHEAD) -> list[Month]:
    """The months of `parent` to make: `now`'s and the next `months` that have no partition, and, since the
    oldest month that has one, a month without one whose rows wait in the DEFAULT (written while the beat
    was down for longer than the months ahead)."""
    existing = partitions(connection, parent)
    current = Month.of(now)
    behind = [m for p in existing if (m := p.month) is not None and m < current]
    wanted = []
    month = min(behind, default=current)
    while month < current:
        if not covered(existing, month) and _default_holds(connection, parent, month):
            wanted.append(month)
        month = month.plus(1)
    return wanted + [m for m in (current.plus(k) for k in range(months + 1)) if not covered(existing, m)]


def ensure_months(connection: Connection, now: datetime, upkeep: Upkeep, months: int = MONTHS_AHEAD) -> None:
    """The partitions `months_wanted` names, for both tables; one transaction each."""
    for parent in PARTITIONED:
        wanted = months_wanted(connection, parent, now, months)
        connection.commit()
        for month in wanted:
            with _step(connection):
                if covered(partitions(connection, parent), month):
                    continue  # another upkeep made it since `wanted` was read
                moved = create_month_partition(connection, parent, month)
            PARTITIONS.labels(parent, PartitionAction.CREATED).inc()
            upkeep.created.append(month_partition(parent, month))
            upkeep.moved += moved
            if moved:
                log.info("partitions: %d rows of %s moved out of %s into %s", moved, month,
                         default_partition(parent), month_partition(parent, month))


def _has_live_task(connection: Connection, partition: str) -> bool:
    # the partial index of live tasks (ix_tasks_tenant_live) answers this without reading the month's rows
    return bool(connection.scalar(text(
        f'SELECT EXISTS (SELECT 1 FROM "{partition}" WHERE status IN {sql_in(LIVE_TASK_STATUSES)})')))


def droppable(connection: Connection, cutoff: datetime) -> Partition | None:
    """The oldest month of `tasks` whose whole range is older than `cutoff` and that holds no live task."""
    for partition in partitions(connection, "tasks"):
        month = partition.month
        if month is None or month.plus(1).start > cutoff:
            continue
        if not _has_live_task(connection, partition.name):
            return partition
    return None


def drop_month(connection: Connection, partition: Partition, cutoff: datetime) -> bool:
    """Drop the month of `tasks` (see the module's docstring); False when it may not go after all."""
    month = partition.month
    assert month is not None
    marker = dropped_marker(month)
    with _step(connection):
        connection.execute(text(
            f'CREATE TABLE IF NOT EXISTS "{marker}" AS SELECT job_id, item_id FROM "{partition.name}" '
            "WHERE job_id IS NOT NULL AND item_id IS NOT NULL"))
    with _step(connection):
        lock_exclusively(connection, "tasks")
        still = next((p for p in partitions(connection, "tasks") if p.name == partition.name), None)
        if still is None or month.plus(1).start > cutoff or _has_live_task(connection, partition.name):
            connection.execute(text(f'DROP TABLE "{marker}"'))
            return False
        drop_partition(connection, partition.name)
    PARTITIONS.labels("tasks", PartitionAction.DROPPED).inc()
    log.info("partitions: %s dropped (tasks of %s; their ledger rows stay)", partition.name, month)
    return True


def _referring_cleanups(month: Month) -> list[str]:
    """The statements that clear, `:limit` rows at a time, what refers to a task of the dropped `month`
    (an id in its range that no partition holds: the DEFAULT could take one again)."""
    lower, upper = month.bound, month.plus(1).bound
    gone = "task_id >= '{lo}' AND task_id < '{hi}' AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = {col})"
    statements = [
        f"UPDATE {table} SET task_id = NULL WHERE id IN (SELECT id FROM {table} WHERE "
        + gone.format(lo=lower, hi=upper, col=f"{table}.task_id") + " LIMIT :limit)"
        for table in ("classifications", "quality_comparisons")]
    statements.append(
        "DELETE FROM task_idempotency_keys WHERE (tenant_id, idempotency_key) IN (SELECT tenant_id, idempotency_key "
        "FROM task_idempotency_keys k WHERE " + gone.format(lo=lower, hi=upper, col="k.task_id") + " LIMIT :limit)")
    marker = dropped_marker(month)
    # the marker's rows go with the item ids they give back, in the same transaction
    statements.append(
        f'WITH batch AS (DELETE FROM "{marker}" WHERE ctid IN (SELECT ctid FROM "{marker}" LIMIT :limit) '
        "RETURNING job_id, item_id), released AS (DELETE FROM job_item_ids j USING batch b "
        "WHERE j.job_id = b.job_id AND j.item_id = b.item_id) SELECT count(*) FROM batch")
    return statements


def clean_dropped(connection: Connection, month: Month, batch_size: int, deadline: float, upkeep: Upkeep) -> bool:
    """Clean what referred to the tasks of the dropped `month`, a batch per transaction, until done (then
    the marker is dropped: True) or the deadline passes (False: the next tick goes on)."""
    for statement in _referring_cleanups(month):
        while True:
            if time.monotonic() >= deadline:
                return False
            with _step(connection):
                result = connection.execute(text(statement), {"limit": batch_size})
                done = int(result.scalar() or 0) if result.returns_rows else int(result.rowcount or 0)
            upkeep.cleaned += done
            if done < batch_size:
                break
    with _step(connection):
        connection.execute(text(f'DROP TABLE IF EXISTS "{dropped_marker(month)}"'))
    return True


def pending_drops(connection: Connection) -> list[Month]:
    """The dropped months whose cleaning has not finished, oldest first: those with a marker table and no
    partition (a marker beside its partition is a drop that did not happen: `drop_month` takes it up)."""
    names = connection.scalars(text(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
        f"AND relname ~ '^tasks_[0-9]{{4}}_[0-9]{{2}}_{DROPPED_SUFFIX}$' ORDER BY relname")).all()
    kept = {p.month for p in partitions(connection, "tasks")}
    connection.commit()
    months = [Month(int(name[6:10]), int(name[11:13])) for name in names]
    return [month for month in months if month not in kept]


def _clean_pending(connection: Connection, batch_size: int, deadline: float, upkeep: Upkeep) -> bool:
    """Clean after the months dropped before; whether all of it is done."""
    return all(clean_dropped(connection, month, batch_size, deadline, upkeep) for month in pending_drops(connection))


def _retire(connection: Connection, cutoff: datetime, batch_size: int, deadline: float, upkeep: Upkeep) -> None:
    if not _clean_pending(connection, batch_size, deadline, upkeep):
        return
    candidate = droppable(connection, cutoff)
    connection.commit()
    if candidate is not None and drop_month(connection, candidate, cutoff):
        upkeep.dropped.append(candidate.name)
        assert candidate.month is not None
        clean_dropped(connection, candidate.month, batch_size, deadline, upkeep)


def run_upkeep(engine: Engine, now: datetime, *, tasks_days: int | None, batch_size: int,
               budget_seconds: float) -> Upkeep:
    """One upkeep: partitions ahead, then (with `tasks_days`) the cleaning left by an earlier drop and at
    most one month of tasks dropped. A step refused its lock in time ends the upkeep early."""
    upkeep = Upkeep()
    deadline = time.monotonic() + budget_seconds
    with engine.connect() as connection:
        try:
            ensure_months(connection, now, upkeep)
            if tasks_days is not None:
                _retire(connection, now - timedelta(days=tasks_days), batch_size, deadline, upkeep)
            else:  # a drop left half done before tasks_days was unset
                _clean_pending(connection, batch_size, deadline, upkeep)
        except UpkeepBusy:
            upkeep.skipped = True
        except OperationalError as exc:
            if not _lock_refused(exc):
                raise
            log.info("partitions: a lock was not granted within %d ms; the next tick tries again", LOCK_TIMEOUT_MS)
        finally:
            connection.rollback()
    return upkeep
