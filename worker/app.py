"""The Celery application of the worker and beat processes."""

from __future__ import annotations

from datetime import timedelta

from celery import Celery

from core.config import AppConfig
from core.messaging import ASSEMBLE_BATCHES, POLL_BATCHES, RECONCILE, celery_settings
from core.settings import Settings


def beat_schedule(config: AppConfig) -> dict[str, dict[str, object]]:
    return {
        "reconcile": {"task": RECONCILE, "schedule": timedelta(seconds=config.reconciler.interval_seconds)},
        "assemble-batches": {"task": ASSEMBLE_BATCHES,
                             "schedule": timedelta(seconds=config.batch.assemble_interval_seconds)},
        "poll-batches": {"task": POLL_BATCHES, "schedule": timedelta(seconds=config.batch.poll_interval_seconds)},
    }


def create_celery_app(settings: Settings, config: AppConfig) -> Celery:
    app = Celery("tierbatch")
    app.conf.update(celery_settings(settings))
    app.conf.beat_schedule = beat_schedule(config)
    # registers the shared tasks with this app
    import worker.tasks  # noqa: F401

    return app
