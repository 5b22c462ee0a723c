"""The background lane's worker side (the design: tierbatch.tasks.lane): the pump that claims work within
the bound, the call of one claimed task, and the lane's pause after a 429.

The pump runs after routing put tasks in the lane, after each lane call (its slot is free again) and on
a beat (retries that became due, a pause that ended, leases the reconciler released). A 429 of the lane's
provider sets `<prefix>tierbatch:lane:<provider>:paused` for the provider's `retry-after` (else the
immediate policy's backoff): while it exists no pump claims anything, and the task goes back, due after
the same delay. Redis unreachable: no pause is kept (the task's own delay still holds).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery, shared_task
from celery import Task as CeleryTask
from redis.exceptions import RedisError

from tierbatch.base.errors import RetryableProviderError
from tierbatch.base.logs import bound, task_id_var
from tierbatch.base.messaging import CALL_LANE, LANE_PUMP
from tierbatch.providers.client import ChatResult
from tierbatch.providers.retry import ChatCall, backoff_delay
from tierbatch.routing.tiers import lane_provider
from tierbatch.tasks.lane import claim_lane_tasks, claimed_lane_task
from tierbatch.tasks.store import renew_lease
from tierbatch.worker.context import WorkerContext, context_of
from tierbatch.worker.immediate import CallWrapper, PushedBack, serve_claimed

log = logging.getLogger(__name__)

RATE_LIMITED = 429


def _pause_key(ctx: WorkerContext, provider: str) -> str:
    return f"{ctx.settings.redis_key_prefix}tierbatch:lane:{provider}:paused"


def lane_paused(ctx: WorkerContext, provider: str) -> bool:
    if ctx.redis is None:
        return False
    try:
        return bool(ctx.redis.exists(_pause_key(ctx, provider)))
    except RedisError:
        log.warning("lane: Redis unreachable; the pause after a 429 is not checked", exc_info=True)
        return False


def pause_lane(ctx: WorkerContext, provider: str, seconds: float) -> None:
    if ctx.redis is None:
        return
    try:
        key, millis = _pause_key(ctx, provider), max(1, math.ceil(seconds * 1000))
        # lengthened, never shortened: a shorter retry-after of a concurrent 429 does not end a longer pause
        if int(ctx.redis.pttl(key)) < millis:  # type: ignore[arg-type]
            ctx.redis.set(key, "1", px=millis)
    except RedisError:
        log.warning("lane: Redis unreachable; the pause after a 429 is not kept", exc_info=True)


def pump_lane(ctx: WorkerContext, app: Celery) -> int:
    """Claim what the bound leaves room for and send one call message per claimed task; how many."""
    provider = lane_provider(ctx.config)
    if provider is None or lane_paused(ctx, provider):
        return 0
    with ctx.sessions.begin() as session:
        claimed = claim_lane_tasks(session, ctx.config, ctx.config.immediate.lease_seconds)
    for task in claimed:
        # lost on the way (broker down): the lease runs out, the reconciler releases the task
        app.send_task(CALL_LANE, args=[str(task.id), str(task.lease_token)])
    return len(claimed)


def honouring_rate_limits(ctx: WorkerContext, provider: str) -> CallWrapper:
    """A call wrapper: a 429 of the lane's provider pauses the lane and puts the task back (PushedBack)
    instead of waiting in this worker's thread or moving on to the rest of the chain."""

    def wrap(call: ChatCall) -> ChatCall:
        def wrapped(name: str, model: str, request: Mapping[str, Any]) -> ChatResult:
            try:
                return call(name, model, request)
            except RetryableProviderError as exc:
                if name != provider or exc.status_code != RATE_LIMITED:
                    raise
                delay = backoff_delay(ctx.config.immediate, 0, exc.retry_after)
                pause_lane(ctx, provider, delay)
                raise PushedBack(exc, delay) from exc

        return wrapped

    return wrap


def run_lane_call(ctx: WorkerContext, task_id: uuid.UUID, token: uuid.UUID) -> None:
    """Serve one task the pump claimed under `token` (nothing if the lease is gone meanwhile)."""
    provider = lane_provider(ctx.config)
    lease = ctx.config.immediate.lease_seconds
    with ctx.sessions.begin() as session:
        claimed = claimed_lane_task(session, task_id, token)
        # the message may have waited: a fresh lease before the call, or nothing if it ran out
        if claimed is None or not renew_lease(session, task_id, token, lease):
            return
    serve_claimed(ctx, claimed, honouring_rate_limits(ctx, provider) if provider is not None else None)
    # a retry is due later: the beat's pump takes it then (no wake-up message past the bound)


@shared_task(name=LANE_PUMP, bind=True)
def pump(self: CeleryTask) -> int:
    return pump_lane(context_of(self.app), self.app)


@shared_task(name=CALL_LANE, bind=True)
def call_lane(self: CeleryTask, task_id: str, lease_token: str) -> None:
    ctx = context_of(self.app)
    try:
        with bound(task_id_var, task_id):
            run_lane_call(ctx, uuid.UUID(task_id), uuid.UUID(lease_token))
    finally:
        pump_lane(ctx, self.app)  # this call's slot is free again
