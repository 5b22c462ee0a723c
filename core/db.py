"""Engine and session factories. Callers own transactions; nothing here commits."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str, pool_size: int = 5) -> Engine:
    return create_engine(database_url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True,
                         future=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)
