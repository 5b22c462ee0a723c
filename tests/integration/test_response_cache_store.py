"""The response cache under a batch path's load: filling it from a whole batch chunk (more answers than
one statement can bind: Postgres takes at most 65,535 parameters), and hits on shared entries from
routings running at once.

The first test writes in one transaction that is rolled back; the second commits (two transactions must
meet) and deletes its rows at the end: nothing is left in the session database."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tierbatch.cache.responses import CachedAnswer, cache_key, store_answers, take_hits
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import ResponseCacheEntry, Tenant
from tierbatch.ledger.pricing import TokenUsage

pytestmark = pytest.mark.integration

ANSWERS = 5000  # a 10,000-line chunk of deterministic requests holds as many; 5,000 x ~20 > 65,535


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


def test_hits_on_shared_entries_from_concurrent_routings_do_not_deadlock(migrated_database_url: str) -> None:
    """Two routings (each its own transaction, as two dispatch chunks are) take hits on the same entries
    listed in opposite orders, again and again: the rows are locked in one order, so neither waits on the
    other in a cycle (Postgres would abort one with a deadlock error)."""
    engine = make_engine(migrated_database_url, pool_size=2)
    sessions = make_session_factory(engine)
    tenant_id = uuid.uuid4()
    keys = [cache_key("gpt-4o-mini", {"messages": [{"role": "user", "content": f"repeat {i}"}]}) for i in range(400)]
    try:
        with sessions.begin() as session:
            session.add(Tenant(id=tenant_id, name="cache-hits"))
            session.flush()
            store_answers(session, [(tenant_id, key, answer(i, "billing"), uuid.uuid4()) for i, key in enumerate(keys)],
                          ttl_seconds=3600)
        barrier = threading.Barrier(2)

        def route(order: list[bytes]) -> int:
            found = 0
            for _ in range(15):
                barrier.wait(timeout=30)
                with sessions.begin() as session:
                    found += len(take_hits(session, [(tenant_id, key) for key in order]))
            return found

        with ThreadPoolExecutor(max_workers=2) as pool:
            forward = pool.submit(route, keys)
            backward = pool.submit(route, keys[::-1])
            assert (forward.result(timeout=120), backward.result(timeout=120)) == (400 * 15, 400 * 15)
        with sessions() as session:
            hits = session.scalars(select(func.sum(ResponseCacheEntry.hits))
                                   .where(ResponseCacheEntry.tenant_id == tenant_id)).one()
        assert hits == 400 * 15 * 2
    finally:
        with sessions.begin() as session:
            session.execute(delete(ResponseCacheEntry).where(ResponseCacheEntry.tenant_id == tenant_id))
            session.execute(delete(Tenant).where(Tenant.id == tenant_id))
        engine.dispose()
