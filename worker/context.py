"""Per-process resources of a worker: settings, config, database, prices, provider clients.

The Celery app is created with the process's settings and config (`tierbatch.worker.app.create_celery_app`), once,
by the command that starts the process; the context is built from them on first use inside the process
that runs the tasks (after the prefork fork, so no connection crosses it), never at import time and never
from the environment a second time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base.config import AppConfig
from tierbatch.base.secretbox import SecretBox
from tierbatch.base.settings import Settings
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.ledger.pricing import PriceBook
from tierbatch.providers.client import ProviderClients


def no_pause(step: str) -> None:
    """The production crash-point hook: nothing happens at a named step."""


@dataclass
class WorkerContext:
    settings: Settings
    config: AppConfig
    engine: Engine
    sessions: sessionmaker[Session]
    prices: PriceBook
    providers: ProviderClients
    secret_box: SecretBox | None = None  # decrypts webhook secrets; None: TIERBATCH_SECRET_KEY not set
    # called at named steps of the batch path (after_upload, after_create, mid_ingest); crash tests install
    # one that stops there so the process can be killed at exactly that point
    pause: Callable[[str], None] = no_pause
    # the background lane's pause after a 429 (tierbatch.worker.lane); connects on first use
    redis: redis.Redis | None = None


def build_worker_context(settings: Settings, config: AppConfig, *,
                         pause: Callable[[str], None] = no_pause) -> WorkerContext:
    engine = make_engine(settings.database_url, pgbouncer=config.database.pgbouncer)
    return WorkerContext(settings, config, engine, make_session_factory(engine), PriceBook(config),
                         ProviderClients(config), settings.secret_box(), pause,
                         redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5))


class TierbatchCelery(Celery):
    """The worker's Celery app: it carries the settings and config it was created with, and builds the
    process's `WorkerContext` from them once."""

    def __init__(self, settings: Settings, config: AppConfig, *, pause: Callable[[str], None] = no_pause) -> None:
        super().__init__("tierbatch")
        self.tierbatch_settings = settings
        self.tierbatch_config = config
        self._pause = pause
        self._context: WorkerContext | None = None
        self._context_lock = threading.Lock()  # the threads pool may ask from several threads at once

    @property
    def worker_context(self) -> WorkerContext:
        if self._context is None:
            with self._context_lock:
                if self._context is None:
                    self._context = build_worker_context(self.tierbatch_settings, self.tierbatch_config,
                                                         pause=self._pause)
        return self._context


def context_of(app: Celery) -> WorkerContext:
    """The context of the process running a task of `app` (the task's own `self.app`)."""
    if not isinstance(app, TierbatchCelery):
        raise TypeError("tierbatch tasks run under the app made by worker.app.create_celery_app")
    return app.worker_context
