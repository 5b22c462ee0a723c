"""Engine and session factories. Callers own transactions; nothing here commits."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, create_engine, or_
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str, pool_size: int = 5) -> Engine:
    return create_engine(database_url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True,
                         future=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def newest_first_page(session: Session, query: Select[Any], model: Any, *, limit: int,
                      after: tuple[datetime, uuid.UUID] | None) -> list[Any]:
    """Keyset pagination on (created_at, id), newest first: up to limit + 1 rows (the extra one says
    whether there is a next page). `model` is a mapped class with `created_at` and `id` columns."""
    if after is not None:
        created, last_id = after
        query = query.where(or_(model.created_at < created,
                                and_(model.created_at == created, model.id < last_id)))
    return list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
