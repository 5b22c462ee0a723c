"""The reconciler against a backlog (worker/reconcile.py): a queued task whose message may still wait in
the immediate queue, not drained since, is not sent again; one whose message was lost is.

Against the test Postgres (rows in a transaction that is rolled back, so the session stack's own
reconciler never sees them) and the test Redis under a key prefix of this test's own, with the queues'
lists as kombu's Redis transport keeps them."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
import redis
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from tests.conftest import TEST_REDIS_URL
from tests.support.procs import free_port
from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.ids import new_task_ids
from tierbatch.base.settings import Settings
from tierbatch.db.models import Task, Tenant
from tierbatch.tasks.store import stale_queued_task_ids
from tierbatch.worker.context import WorkerContext, build_worker_context
from tierbatch.worker.reconcile import DRAINED_KEY, queue_backlog

pytestmark = pytest.mark.integration

STALE = 60.0  # [reconciler] queued_stale_seconds
BACKLOG = 600.0  # [reconciler] queued_backlog_seconds


@contextmanager
def worker_context(database_url: str, backlog_seconds: float = BACKLOG) -> Iterator[WorkerContext]:
    prefix = f"test-backlog-{uuid.uuid4().hex[:8]}:"
    data = default_config_data()
    data["reconciler"] = {"queued_stale_seconds": STALE, "queued_backlog_seconds": backlog_seconds}
    settings = Settings(DATABASE_URL=database_url, REDIS_URL=TEST_REDIS_URL,
                        TIERBATCH_REDIS_PREFIX=prefix)  # type: ignore[call-arg]
    context = build_worker_context(settings, parse_config(data, environ={}))
    try:
        yield context
    finally:
        assert context.redis is not None
        for key in context.redis.scan_iter(match=prefix + "*"):
            context.redis.delete(key)
        context.providers.close()
        context.engine.dispose()


@pytest.fixture
def ctx(migrated_database_url: str) -> Iterator[WorkerContext]:
    with worker_context(migrated_database_url) as context:
        yield context


def add_queued(session: Session, dispatched_minutes_ago: dict[str, float | None]) -> dict[str, uuid.UUID]:
    """Queued immediate tasks created an hour ago, each dispatched so many minutes ago (None: never)."""
    now: datetime = session.execute(select(func.now())).scalar_one()
    tenant = Tenant(id=uuid.uuid4(), name="backlog")
    session.add(tenant)
    session.flush()
    ids = dict(zip(dispatched_minutes_ago, new_task_ids(len(dispatched_minutes_ago)), strict=True))
    session.execute(insert(Task), [
        {"id": ids[name], "tenant_id": tenant.id, "task_type": "chat", "requested_tier": "complex",
         "tier": "complex", "tier_reason": "explicit", "urgent": True, "request": {"messages": []},
         "status": "queued", "attempts": 0, "created_at": now - timedelta(hours=1),
         "dispatched_at": None if ago is None else now - timedelta(minutes=ago)}
        for name, ago in dispatched_minutes_ago.items()])
    return ids


def resent(session: Session, ctx: WorkerContext, ids: dict[str, uuid.UUID]) -> set[str]:
    """Which of `ids` the reconciler would dispatch again now (other tests' tasks aside)."""
    found = set(stale_queued_task_ids(session, STALE, backlog=queue_backlog(ctx, session)))
    return {name for name, task_id in ids.items() if task_id in found}


def test_a_backlog_keeps_the_messages_it_may_hold_and_the_lost_ones_are_sent_again(
        session: Session, ctx: WorkerContext) -> None:
    assert ctx.redis is not None
    prefix = ctx.settings.redis_key_prefix
    ids = add_queued(session, {"never": None, "2 min": 2, "5 min": 5, "15 min": 15, "25 min": 25, "30 s": 0.5})
    now: datetime = session.execute(select(func.now())).scalar_one()

    # the immediate queue is empty (the dispatch queue, beat's ticks among its messages, does not count):
    # every stale task is sent again, and the drain is noted on the database's clock
    ctx.redis.lpush(prefix + "dispatch", b"{}")
    assert resent(session, ctx, ids) == {"never", "2 min", "5 min", "15 min", "25 min"}
    noted = ctx.redis.get(prefix + DRAINED_KEY)
    assert noted is not None and datetime.fromisoformat(noted.decode()) == now

    # messages wait in the immediate queue (one of them at a priority above 0), and it was last seen
    # empty 20 minutes ago: tasks dispatched since then may be behind them, unless they waited 10 minutes
    ctx.redis.lpush(prefix + "immediate", b"{}")
    ctx.redis.lpush(prefix + "immediate\x06\x166", b"{}")
    ctx.redis.set(prefix + DRAINED_KEY, (now - timedelta(minutes=20)).isoformat())
    assert resent(session, ctx, ids) == {"never", "15 min", "25 min"}
    ctx.redis.delete(prefix + "immediate")  # the messages of one priority are enough
    assert resent(session, ctx, ids) == {"never", "15 min", "25 min"}

    # Redis does not answer: the same, nothing is held back on a guess
    ctx.redis.set(prefix + DRAINED_KEY, (now - timedelta(minutes=20)).isoformat())
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    assert resent(session, dataclasses.replace(ctx, redis=unreachable), ids) == \
        {"never", "2 min", "5 min", "15 min", "25 min"}
    assert resent(session, ctx, ids) == {"never", "15 min", "25 min"}  # and the note still holds


def redis_uptime(client: redis.Redis, at_least: float) -> float:
    """Redis's uptime in seconds, once it is at least `at_least` (a Redis just started is waited for)."""
    deadline = time.monotonic() + at_least + 30
    while (uptime := float(client.info("server")["uptime_in_seconds"])) < at_least:
        assert time.monotonic() < deadline, "Redis's uptime does not grow"
        time.sleep(0.5)
    return uptime


def test_without_a_note_the_queue_counts_as_drained_when_redis_started(migrated_database_url: str,
                                                                     session: Session) -> None:
    # a backlog wait longer than Redis has been up: what is re-sent below is re-sent for having been
    # dispatched before Redis started, not for having waited too long
    with worker_context(migrated_database_url, backlog_seconds=10 * 86_400) as ctx:
        assert ctx.redis is not None
        prefix = ctx.settings.redis_key_prefix
        uptime = redis_uptime(ctx.redis, at_least=STALE + 15)
        ids = add_queued(session, {"never": None, "before Redis started": (uptime + 30) / 60,
                                   "since, stale": (STALE + 5) / 60, "since, fresh": 0.5})
        now: datetime = session.execute(select(func.now())).scalar_one()
        # messages wait in the immediate queue and no drain is noted (Redis restarted or was flushed)
        ctx.redis.lpush(prefix + "immediate", b"{}")
        assert ctx.redis.get(prefix + DRAINED_KEY) is None
        assert resent(session, ctx, ids) == {"never", "before Redis started"}
        # and Redis's start is noted as the drain, for the runs after this one
        noted = ctx.redis.get(prefix + DRAINED_KEY)
        assert noted is not None
        assert timedelta(0) < now - datetime.fromisoformat(noted.decode()) - timedelta(seconds=uptime) \
            <= timedelta(seconds=3)
        assert resent(session, ctx, ids) == {"never", "before Redis started"}
