"""Per-process resources of a worker: settings, config, database, prices, provider clients.

Built lazily on first use inside the process that needs them (after the prefork fork), never at
import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import AppConfig, load_config
from core.db import make_engine, make_session_factory
from core.pricing import PriceBook
from core.provider import ProviderClients
from core.secretbox import SecretBox
from core.settings import Settings


@dataclass
class WorkerContext:
    settings: Settings
    config: AppConfig
    engine: Engine
    sessions: sessionmaker[Session]
    prices: PriceBook
    providers: ProviderClients
    secret_box: SecretBox | None = None  # decrypts webhook secrets; None: TIERBATCH_SECRET_KEY not set


@functools.cache
def get_worker_context() -> WorkerContext:
    settings = Settings()
    config = load_config(settings.config_path)
    engine = make_engine(settings.database_url)
    return WorkerContext(settings, config, engine, make_session_factory(engine), PriceBook(config),
                         ProviderClients(config), settings.secret_box())
