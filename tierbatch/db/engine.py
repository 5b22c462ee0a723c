"""Engine and session factories. Callers own transactions; nothing here commits."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, create_engine, or_
from sqlalchemy.orm import Session, sessionmaker

# connections a pool opens beyond its `pool_size` while all of those are in use (returned, they are closed)
MAX_OVERFLOW = 10


def make_engine(database_url: str, pool_size: int = 5, *, pgbouncer: bool = False) -> Engine:
    """`pgbouncer`: the URL is a PgBouncer in transaction pooling mode (`[database] pgbouncer`): psycopg
    prepares no statement on the server, where the next transaction may be another client's."""
    connect_args: dict[str, Any] = {"prepare_threshold": None} if pgbouncer else {}
    return create_engine(database_url, pool_size=pool_size, max_overflow=MAX_OVERFLOW, pool_pre_ping=True,
                         future=True, connect_args=connect_args)


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
