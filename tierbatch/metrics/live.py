"""Gauges read at scrape time, in the API's `/metrics` only (one process, not once per worker child):
live tasks, the batch path's waiting work and provider batches in flight from a few grouped statements
over the partial indexes of live rows, and the models cooling down (read from Redis by the caller).

`read_snapshot` runs the statements in one read-only transaction with a statement timeout; a slow or
unreachable database gives a snapshot with `database_up = False` and no database series, never a
hung scrape. `LiveCollector` turns a snapshot into metric families (pure: unit-tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from tierbatch.base.config import ModelRef
from tierbatch.base.states import LIVE_TASK_STATUSES, TERMINAL_BATCH_STATUSES, BatchStatus, TaskStatus, sql_in
from tierbatch.metrics.catalog import NO_MODE

log = logging.getLogger(__name__)

# each predicate is the one of a partial index (db/models), written the same way so the planner uses it
_LIVE_TASKS = text(
    f"SELECT status::text, tier::text, coalesce(mode::text, '{NO_MODE}'), count(*) FROM tasks "
    f"WHERE status IN {sql_in(LIVE_TASK_STATUSES)} GROUP BY 1, 2, 3")
_WAITING = text(
    "SELECT provider, model, count(*), extract(epoch FROM now() - min(created_at))::float8 FROM tasks "
    f"WHERE status = '{TaskStatus.WAITING_BATCH}' GROUP BY 1, 2")
_OPEN_BATCHES = text(
    "SELECT status::text, count(*), extract(epoch FROM now() - min(created_at))::float8 FROM provider_batches "
    f"WHERE status NOT IN {sql_in(TERMINAL_BATCH_STATUSES)} GROUP BY 1")

OPEN_BATCH_STATUSES = tuple(status for status in BatchStatus if status not in TERMINAL_BATCH_STATUSES)


@dataclass(frozen=True)
class Snapshot:
    database_up: bool = False
    live_tasks: Sequence[tuple[str, str, str, int]] = ()  # status, tier, mode, count
    waiting: Sequence[tuple[str, str, int, float]] = ()  # provider, model, count, oldest wait (s)
    open_batches: Sequence[tuple[str, int, float]] = ()  # status, count, oldest age (s)
    # (provider, model) → cooling down; None: Redis was not readable (no series)
    cooling: Mapping[tuple[str, str], bool] | None = None
    batch_models: Sequence[ModelRef] = field(default_factory=tuple)  # configured: a zero when none waits


def read_snapshot(engine: Engine, timeout_seconds: float, batch_models: Sequence[ModelRef] = (),
                  cooling: Mapping[tuple[str, str], bool] | None = None) -> Snapshot:
    try:
        with engine.connect() as connection, connection.begin():
            connection.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                               {"ms": str(max(1, int(timeout_seconds * 1000)))})
            connection.execute(text("SET TRANSACTION READ ONLY"))
            live = [(str(s), str(t), str(m), int(n)) for s, t, m, n in connection.execute(_LIVE_TASKS)]
            waiting = [(str(p), str(m), int(n), float(age or 0)) for p, m, n, age in connection.execute(_WAITING)]
            batches = [(str(s), int(n), float(age or 0)) for s, n, age in connection.execute(_OPEN_BATCHES)]
    except Exception as exc:  # the scrape still answers: the process series, and database_up 0
        log.warning("metrics: the database gauges could not be read: %s", exc)
        return Snapshot(cooling=cooling, batch_models=tuple(batch_models))
    return Snapshot(True, live, waiting, batches, cooling, tuple(batch_models))


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "tasks": GaugeMetricFamily("tierbatch_tasks_live", "Tasks not yet finished.",
                                   labels=["status", "tier", "mode"]),
        "waiting": GaugeMetricFamily("tierbatch_batch_waiting_tasks", "Tasks waiting for a provider batch.",
                                     labels=["provider", "model"]),
        "oldest_wait": GaugeMetricFamily("tierbatch_batch_oldest_wait_seconds",
                                         "Age of the oldest task waiting for a provider batch.",
                                         labels=["provider", "model"]),
        "batches": GaugeMetricFamily("tierbatch_provider_batches_live", "Provider batches not done or failed.",
                                     labels=["status"]),
        "oldest_batch": GaugeMetricFamily("tierbatch_provider_batch_oldest_age_seconds",
                                          "Age of the oldest provider batch in this status.", labels=["status"]),
        "cooling": GaugeMetricFamily("tierbatch_model_cooling", "1 while the model's circuit is open.",
                                     labels=["provider", "model"]),
        "up": GaugeMetricFamily("tierbatch_metrics_database_up",
                                "1 when this scrape's database queries answered in time."),
    }


def families_of(snapshot: Snapshot) -> list[Metric]:
    out = _families()
    out["up"].add_metric([], 1.0 if snapshot.database_up else 0.0)
    if snapshot.database_up:
        for status, tier, mode, count in snapshot.live_tasks:
            out["tasks"].add_metric([status, tier, mode], count)
        waiting = {(ref.provider, ref.model): (0, 0.0) for ref in snapshot.batch_models}
        waiting.update({(p, m): (n, age) for p, m, n, age in snapshot.waiting})
        for (provider, model), (count, age) in sorted(waiting.items()):
            out["waiting"].add_metric([provider, model], count)
            out["oldest_wait"].add_metric([provider, model], age)
        batches: dict[str, tuple[int, float]] = {str(status): (0, 0.0) for status in OPEN_BATCH_STATUSES}
        batches.update({status: (n, age) for status, n, age in snapshot.open_batches})
        for status, (count, age) in batches.items():
            out["batches"].add_metric([status], count)
            out["oldest_batch"].add_metric([status], age)
    if snapshot.cooling is not None:
        for (provider, model), cooling in sorted(snapshot.cooling.items()):
            out["cooling"].add_metric([provider, model], 1.0 if cooling else 0.0)
    return [family for family in out.values() if family.samples]


class LiveCollector(Collector):
    """One snapshot's families, for one scrape's registry. `describe` names them without a query."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        if self._snapshot is not None:
            yield from families_of(self._snapshot)
