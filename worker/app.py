"""The Celery application of the worker and beat processes."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery.signals import setup_logging, worker_process_shutdown

from tierbatch.base.broker import install_repaired_transport
from tierbatch.base.config import AppConfig
from tierbatch.base.logs import configure_logging
from tierbatch.base.messaging import (
    ASSEMBLE_BATCHES,
    EXPIRE_CLIENT_BATCHES,
    JOB_WEBHOOK_TICK,
    LANE_PUMP,
    PARTITIONS_TICK,
    POLL_BATCHES,
    RECONCILE,
    RETENTION_TICK,
    SCHEDULE_TICK,
    celery_settings,
)
from tierbatch.base.settings import Settings
from tierbatch.metrics.process import mark_dead
from tierbatch.routing.tiers import lane_provider
from tierbatch.worker.context import TierbatchCelery, no_pause


@setup_logging.connect(weak=False)
def _configure_worker_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """A receiver of Celery's `setup_logging` keeps Celery from installing its own root handler: worker and
    beat log in the format of TIERBATCH_LOG_FORMAT (set by `--log-format`), with the task's ids."""
    configure_logging(level=loglevel or "INFO")


def beat_schedule(config: AppConfig) -> dict[str, dict[str, object]]:
    lane: dict[str, dict[str, object]] = {}
    if lane_provider(config) is not None:
        # the background lane: retries that became due, a pause that ended, released leases
        lane["lane-pump"] = {"task": LANE_PUMP, "schedule": timedelta(seconds=config.batch.assemble_interval_seconds)}
    if config.retention.bodies_days is not None:
        # retention: bodies of tasks finished more than bodies_days ago are removed, batch by batch
        lane["retention-tick"] = {"task": RETENTION_TICK,
                                  "schedule": timedelta(seconds=config.retention.interval_seconds)}
    return {**lane,
        # partitions: this month's and the next three always exist; with tasks_days, old months are dropped
        "partitions-tick": {"task": PARTITIONS_TICK, "schedule": timedelta(seconds=config.retention.interval_seconds)},
        "reconcile": {"task": RECONCILE, "schedule": timedelta(seconds=config.reconciler.interval_seconds)},
        "assemble-batches": {"task": ASSEMBLE_BATCHES,
                             "schedule": timedelta(seconds=config.batch.assemble_interval_seconds)},
        "poll-batches": {"task": POLL_BATCHES, "schedule": timedelta(seconds=config.batch.poll_interval_seconds)},
        # Batch API facade: client batches past their 24 h window expire (one query when none is due)
        "expire-client-batches": {"task": EXPIRE_CLIENT_BATCHES,
                                  "schedule": timedelta(seconds=config.batch.poll_interval_seconds)},
        # scheduled classification: cron has minute resolution; a run starts within a few seconds
        "schedules-tick": {"task": SCHEDULE_TICK,
                           "schedule": timedelta(seconds=min(5.0, config.batch.poll_interval_seconds))},
        # job webhooks: finished jobs with a webhook_url are notified within a few seconds
        "job-webhooks-tick": {"task": JOB_WEBHOOK_TICK,
                              "schedule": timedelta(seconds=min(5.0, config.batch.poll_interval_seconds))},
    }


def _metrics_of_ended_child(pid: int | None = None, **_: Any) -> None:
    """A prefork child ends: its live gauges leave the multiprocess sums (its counters stay)."""
    mark_dead(pid or os.getpid())


worker_process_shutdown.connect(_metrics_of_ended_child, weak=False)


def create_celery_app(settings: Settings, config: AppConfig, *,
                      pause: Callable[[str], None] = no_pause) -> TierbatchCelery:
    """The app of a worker or beat process, holding the settings and config its tasks run with; `pause`
    is the crash-point hook of the batch path (a no-op but in crash tests)."""
    install_repaired_transport()
    app = TierbatchCelery(settings, config, pause=pause)
    app.conf.update(celery_settings(settings))
    app.conf.beat_schedule = beat_schedule(config)
    # registers the shared tasks with this app
    import tierbatch.worker.facade  # Batch API facade: expiry of client batches
    import tierbatch.worker.lane  # the background lane
    import tierbatch.worker.quality  # quality-aware routing
    import tierbatch.worker.retention  # retention of task bodies
    import tierbatch.worker.schedules  # scheduled classification
    import tierbatch.worker.tasks
    import tierbatch.worker.webhooks  # noqa: F401  job webhooks

    return app
