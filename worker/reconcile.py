"""The reconciler: Postgres is the truth, Redis only carries messages. Whatever a crash or a
Redis flush lost is found here by its state and dispatched again."""

from __future__ import annotations

import logging
import uuid

from tierbatch.base.messaging import DISPATCH_CHUNK
from tierbatch.metrics.catalog import RECONCILER_ACTIONS, ReconcilerAction
from tierbatch.routing.tiers import lane_provider
from tierbatch.tasks.lane import lane_members
from tierbatch.tasks.store import stale_queued_task_ids
from tierbatch.tasks.transitions import release_expired_leases
from tierbatch.worker.context import WorkerContext

log = logging.getLogger(__name__)


def find_tasks_to_redispatch(ctx: WorkerContext) -> list[uuid.UUID]:
    with ctx.sessions.begin() as session:
        released = release_expired_leases(session)
    if released:
        log.warning("reconciler: %d running tasks lost their worker; queued again", len(released))
        RECONCILER_ACTIONS.labels(ReconcilerAction.LEASES_RELEASED).inc(len(released))
    with ctx.sessions.begin() as session:
        # the background lane's backlog is queued on purpose: its pump takes it, not a re-dispatch
        lane = lane_members() if lane_provider(ctx.config) is not None else None
        stale = stale_queued_task_ids(session, ctx.config.reconciler.queued_stale_seconds, exclude=lane)
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
