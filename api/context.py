"""Resources of one API process, built by the app factory (never at import time)."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import AppConfig
from core.db import make_engine, make_session_factory
from core.messaging import make_producer
from core.settings import Settings


@dataclass
class ApiContext:
    settings: Settings
    config: AppConfig
    engine: Engine
    sessions: sessionmaker[Session]
    producer: Celery

    @classmethod
    def build(cls, settings: Settings, config: AppConfig) -> ApiContext:
        engine = make_engine(settings.database_url, pool_size=10)
        return cls(settings, config, engine, make_session_factory(engine), make_producer(settings))

    def close(self) -> None:
        self.engine.dispose()
