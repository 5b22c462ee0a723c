"""Immediate calls: claim under a lease, call along the fallback chain, record in one transaction."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tierbatch.base.errors import ChainExhausted, RetryableProviderError
from tierbatch.base.states import Tier
from tierbatch.cache.responses import (
    CachedAnswer,
    Claim,
    cache_key,
    fill_claim,
    lookup_or_claim,
    release_claim,
    wants_cache,
)
from tierbatch.providers.retry import ChatCall, backoff_delay, call_with_fallbacks
from tierbatch.tasks.labels import label_error
from tierbatch.tasks.store import (
    ClaimedTask,
    claim_for_immediate_call,
    fail_running_task,
    finish_from_cache,
    record_immediate_success,
    renew_lease,
    requeue_running_task,
)
from tierbatch.worker.context import WorkerContext
from tierbatch.worker.errors import task_error
from tierbatch.worker.quality import maybe_send_shadow  # quality-aware routing

log = logging.getLogger(__name__)

CallWrapper = Callable[[ChatCall], ChatCall]


class PushedBack(Exception):
    """Raised through the chain by a call wrapper: the provider asked us to slow down (a 429), so the task
    goes back to `queued`, due after `delay` seconds, without trying the rest of the chain."""

    def __init__(self, error: RetryableProviderError, delay: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.delay = delay


@contextmanager
def lease_kept_alive(ctx: WorkerContext, claimed: ClaimedTask) -> Iterator[None]:
    """Renew the task's lease while the call is in flight, so the reconciler leaves it alone;
    if this process dies, renewals stop and the lease expires."""
    lease = ctx.config.immediate.lease_seconds
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            try:
                with ctx.sessions.begin() as session:
                    if not renew_lease(session, claimed.id, claimed.lease_token, lease):
                        return  # lost: whatever we get back will be discarded on record
            except Exception:  # a failed renewal is retried on the next tick
                log.warning("lease renewal failed for task %s", claimed.id, exc_info=True)

    thread = threading.Thread(target=renew, name=f"lease-{claimed.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def run_immediate_call(ctx: WorkerContext, task_id: uuid.UUID, *, escalate: bool = False) -> float | None:
    """Serve one task now. Returns a delay in seconds when the task was put back for a retry."""
    policy = ctx.config.immediate
    with ctx.sessions.begin() as session:
        claimed = claim_for_immediate_call(session, task_id, policy.lease_seconds, escalate=escalate)
    if claimed is None:
        return None  # already done, cancelled, claimed by another worker, or not yet due
    return serve_claimed(ctx, claimed)


def serve_claimed(ctx: WorkerContext, claimed: ClaimedTask, wrap: CallWrapper | None = None) -> float | None:
    """Serve a task this worker holds the lease of: the response cache, then the tier's chain, recorded.
    `wrap` wraps the provider call (the background lane's 429 handling). Returns a delay in seconds when
    the task was put back for a retry."""
    policy = ctx.config.immediate
    task_id = claimed.id
    claim: Claim | None = None
    if wants_cache(ctx.config.cache, claimed.task_type, claimed.request, claimed.metadata):
        with lease_kept_alive(ctx, claimed):
            found = wait_for_cache(ctx, claimed)
        if not isinstance(found, Claim):
            with ctx.sessions.begin() as session:
                finish_from_cache(session, claimed, found, ctx.prices)
            return None
        claim = found
    chain = ctx.config.tier(Tier(claimed.tier)).chain
    try:
        with lease_kept_alive(ctx, claimed):
            call = ctx.providers.chat_for(claimed.task_type, claimed.tenant_id)
            result = call_with_fallbacks(wrap(call) if wrap is not None else call, chain, claimed.request,
                                         policy, time.sleep)
    except PushedBack as pushed:
        with ctx.sessions.begin() as session:
            if claim is not None:
                release_claim(session, claim)
            if requeue_running_task(session, claimed, task_error(pushed.error), pushed.delay):
                log.info("task %s: %s; back in %.1fs", task_id, pushed.error.message, pushed.delay)
                return pushed.delay
        return None
    except ChainExhausted as exhausted:
        message = task_error(exhausted)
        with ctx.sessions.begin() as session:
            if claim is not None:
                release_claim(session, claim)  # an identical request may try again at once
            if exhausted.retryable and claimed.attempts < policy.max_attempts:
                delay = backoff_delay(policy, claimed.attempts, exhausted.retry_after)
                if requeue_running_task(session, claimed, message, delay):
                    log.info("task %s: every model failed, retry in %.1fs: %s", task_id, delay, message)
                    return delay
                return None
            reason = message if not exhausted.retryable else (
                f"gave up after {claimed.attempts} attempts: {message}")
            fail_running_task(session, claimed, reason)
            log.info("task %s failed: %s", task_id, reason)
        return None
    with ctx.sessions.begin() as session:
        charge = record_immediate_success(session, claimed, result, ctx.prices)
        if claim is not None:
            if charge is not None and label_error(claimed.request, result.output) is None:
                fill_claim(session, claim, CachedAnswer(result.provider, result.requested_model,
                                                        result.served_model, result.output, result.body,
                                                        result.usage),
                           ctx.config.cache.ttl_seconds, claimed.id)
            else:
                release_claim(session, claim)
    if charge is None:
        log.warning("task %s: lease lost while calling %s; result discarded", task_id, result.served_model)
        return None
    maybe_send_shadow(ctx, claimed)  # quality-aware routing: shadow sampling
    return None


def wait_for_cache(ctx: WorkerContext, claimed: ClaimedTask) -> CachedAnswer | Claim:
    """A cached answer for the task's request, or the claim to compute it; while an identical request is
    in flight elsewhere, wait for its answer (its claim has a deadline, after which this one takes over)."""
    cache = ctx.config.cache
    key = cache_key(ctx.config.tier(Tier(claimed.tier)).model, claimed.request)
    while True:
        with ctx.sessions.begin() as session:
            found = lookup_or_claim(session, claimed.tenant_id, key, cache.claim_seconds)
        if found is not None:
            return found
        time.sleep(cache.wait_poll_seconds)
