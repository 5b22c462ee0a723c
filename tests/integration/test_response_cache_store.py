"""Filling the response cache from a whole batch chunk: more answers than one statement can bind
(Postgres takes at most 65,535 parameters), each stored once, a live entry kept as it was.

Rows are written in one transaction that is rolled back: nothing is left in the session database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.cache.responses import CachedAnswer, cache_key, store_answers
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import ResponseCacheEntry, Tenant
from tierbatch.ledger.pricing import TokenUsage

pytestmark = pytest.mark.integration

ANSWERS = 5000  # a 10,000-line chunk of deterministic requests holds as many; 5,000 x ~20 > 65,535


@pytest.fixture
def session(migrated_database_url: str) -> Iterator[Session]:
    engine = make_engine(migrated_database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            try:
                yield session
            finally:
                session.rollback()
    finally:
        engine.dispose()


def answer(i: int, output: str) -> CachedAnswer:
    return CachedAnswer("sim", "gpt-4o-mini", "gpt-4o-mini", output, {"id": f"chatcmpl-{i}"},
                        TokenUsage(100 + i, 0, 5))


def test_a_chunk_of_answers_is_stored_whatever_its_size(session: Session) -> None:
    tenant = Tenant(id=uuid.uuid4(), name="cache-fill")
    session.add(tenant)
    session.flush()
    keys = [cache_key("gpt-4o-mini", {"messages": [{"role": "user", "content": f"ticket {i}"}]})
            for i in range(ANSWERS)]
    store_answers(session, [(tenant.id, key, answer(i, "billing"), uuid.uuid4()) for i, key in enumerate(keys)],
                  ttl_seconds=3600)
    stored = dict(session.execute(select(ResponseCacheEntry.key, ResponseCacheEntry.input_tokens)
                                  .where(ResponseCacheEntry.tenant_id == tenant.id)).all())
    assert len(stored) == ANSWERS
    assert all(stored[key] == 100 + i for i, key in enumerate(keys))
    # the same keys again, with other answers: live entries are kept as they are
    store_answers(session, [(tenant.id, key, answer(i, "bug"), uuid.uuid4()) for i, key in enumerate(keys)],
                  ttl_seconds=3600)
    outputs = session.scalars(select(func.count()).select_from(ResponseCacheEntry).where(
        ResponseCacheEntry.tenant_id == tenant.id, ResponseCacheEntry.output == "billing")).one()
    assert outputs == ANSWERS
