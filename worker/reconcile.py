"""The reconciler: Postgres is the truth, Redis only carries messages. Whatever a crash or a
Redis flush lost is found here by its state and dispatched again.

A queued task dispatched a while ago has either lost its message or waits behind others in a long
queue (a backlog of immediate calls drains at the providers' pace). Re-sending the waiting ones would
add a message per task and staleness period to the very queue that is behind, so the reconciler looks:
each run it counts the messages waiting in the immediate queue, and notes when it finds it empty (in
Redis, beside the messages, so that losing one loses the other). While it holds messages, a task
dispatched since that note is left alone until it has waited `queued_backlog_seconds`; a task
dispatched before it has lost its message (the queue drained since), and is re-sent once stale. Without
a note (a Redis restart or flush) the queue counts as drained when Redis started, empty: the tasks
dispatched before then are re-sent once stale, and a restart under a backlog that never drains does
not re-send every later one, period after period. (A task whose dispatch
chunk is still on the dispatch queue has not been dispatched yet: it is re-sent once stale, whatever
the queues hold; that queue drains at thousands of tasks a second, and beat's ticks share it.)"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.base.messaging import DISPATCH_CHUNK, QUEUE_IMMEDIATE
from tierbatch.metrics.catalog import RECONCILER_ACTIONS, ReconcilerAction
from tierbatch.routing.tiers import lane_provider
from tierbatch.tasks.lane import lane_members
from tierbatch.tasks.store import QueueBacklog, stale_queued_task_ids
from tierbatch.tasks.transitions import release_expired_leases
from tierbatch.worker.context import WorkerContext

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of each priority step above 0 in a list of its own
_PRIORITY_LISTS = ("", *(f"\x06\x16{step}" for step in (3, 6, 9)))
DRAINED_KEY = "tierbatch:reconciler:immediate-drained-at"


def queue_backlog(ctx: WorkerContext, session: Session) -> QueueBacklog | None:
    """The backlog of the immediate queue, if it holds messages; None when it is empty now (noted as its
    last drain) or when Redis does not answer (then every stale task is re-sent).

    Without a noted drain (Redis restarted or flushed: the note goes with the messages) the queue counts as
    drained when Redis started: a Redis that keeps nothing on disk starts empty, so a message sent before
    then is lost and its task is re-sent, while one sent since may be waiting behind the backlog. (After a
    flush without a restart, a task dispatched before the flush waits `queued_backlog_seconds` to be
    re-sent instead of `queued_stale_seconds`.)"""
    if ctx.redis is None:
        return None
    prefix = ctx.settings.redis_key_prefix
    now: datetime = session.execute(select(func.now())).scalar_one()  # the clock of `dispatched_at`
    try:
        counting = ctx.redis.pipeline(transaction=False)
        for suffix in _PRIORITY_LISTS:
            counting.llen(prefix + QUEUE_IMMEDIATE + suffix)
        if sum(int(n) for n in counting.execute()) == 0:
            ctx.redis.set(prefix + DRAINED_KEY, now.isoformat())
            return None
        noted = ctx.redis.get(prefix + DRAINED_KEY)
        if isinstance(noted, bytes):
            drained_at = datetime.fromisoformat(noted.decode())
        else:
            # whole seconds, rounded down: a second earlier is the side that re-sends more, not less
            uptime = int(ctx.redis.info("server")["uptime_in_seconds"])
            drained_at = now - timedelta(seconds=uptime + 1)
            ctx.redis.set(prefix + DRAINED_KEY, drained_at.isoformat(), nx=True)
    except (redis.RedisError, KeyError, ValueError):
        return None
    return QueueBacklog(drained_at, ctx.config.reconciler.queued_backlog_seconds)


def find_tasks_to_redispatch(ctx: WorkerContext) -> list[uuid.UUID]:
    with ctx.sessions.begin() as session:
        released = release_expired_leases(session)
    if released:
        log.warning("reconciler: %d running tasks lost their worker; queued again", len(released))
        RECONCILER_ACTIONS.labels(ReconcilerAction.LEASES_RELEASED).inc(len(released))
    with ctx.sessions.begin() as session:
        # the background lane's backlog is queued on purpose: its pump takes it, not a re-dispatch
        lane = lane_members() if lane_provider(ctx.config) is not None else None
        stale = stale_queued_task_ids(session, ctx.config.reconciler.queued_stale_seconds, exclude=lane,
                                      backlog=queue_backlog(ctx, session))
    return list(dict.fromkeys([*released, *stale]))


def count_actions(redispatched: int, submissions: int, ingestions: int, purged: int) -> None:
    for action, count in ((ReconcilerAction.TASKS_REDISPATCHED, redispatched),
                          (ReconcilerAction.SUBMISSIONS_RESUMED, submissions),
                          (ReconcilerAction.INGESTIONS_RESUMED, ingestions),
                          (ReconcilerAction.CACHE_ENTRIES_PURGED, purged)):
        if count:
            RECONCILER_ACTIONS.labels(action).inc(count)


def chunks(ids: list[uuid.UUID], size: int = DISPATCH_CHUNK) -> list[list[str]]:
    return [[str(i) for i in ids[start:start + size]] for start in range(0, len(ids), size)]
