"""Celery tasks. Each takes row ids (or a producer's JSON), is idempotent and safe to run twice."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Task as CeleryTask
from celery import shared_task

from tierbatch.base.errors import Refused, Unauthenticated
from tierbatch.base.logs import batch_id_var, bound, task_id_var
from tierbatch.base.messaging import (
    ASSEMBLE_BATCHES,
    CALL_IMMEDIATE,
    DISPATCH_TASKS,
    INGEST_BATCH,
    LANE_PUMP,
    POLL_BATCHES,
    RECONCILE,
    SUBMIT_BATCH,
    SUBMIT_TASKS,
)
from tierbatch.cache.responses import purge_expired_entries
from tierbatch.routing.tiers import lane_provider
from tierbatch.tasks.store import insert_tasks, mark_dispatched, route_queued_tasks
from tierbatch.tasks.submission import parse_submission
from tierbatch.tenants.store import tenant_for_key
from tierbatch.worker.batch import assemble_batches, ingest_batch, poll_batches, stale_batches, submit_batch
from tierbatch.worker.context import context_of
from tierbatch.worker.errors import rejection
from tierbatch.worker.immediate import run_immediate_call
from tierbatch.worker.reconcile import chunks, count_actions, find_tasks_to_redispatch

log = logging.getLogger(__name__)


@shared_task(name=SUBMIT_TASKS, bind=True)
def submit_tasks(self: CeleryTask, payload: Any, api_key: str) -> dict[str, Any]:
    """Broker-side submission: the same JSON as `POST /v1/tasks`, with the tenant key.

    The tasks are durable once this commits; before that they exist only as this message.
    """
    ctx = context_of(self.app)
    try:
        specs = parse_submission(payload, ctx.config.limits.max_tasks_per_request,
                                 ctx.config.limits.max_prompt_bytes)
    except Refused as exc:
        log.error("submit_tasks rejected: %s", exc.message)
        return rejection(exc)
    try:
        with ctx.sessions.begin() as session:
            # a key revoked a moment ago is refused here too: the database is asked every time
            tenant = tenant_for_key(session, api_key) if isinstance(api_key, str) else None
            if tenant is None:
                # the prefix is not secret (the admin key list shows it) and tells operators which key it was
                shown = api_key[:10] if isinstance(api_key, str) and api_key.isascii() else "?"
                log.error("submit_tasks rejected: invalid or revoked tenant key %s…", shown)
                return rejection(Unauthenticated())
            accepted = insert_tasks(session, tenant.id, specs, ctx.config)
    except Refused as exc:  # e.g. the tenant's monthly budget is reached (policy `reject`)
        log.error("submit_tasks rejected: %s", exc.message)
        return rejection(exc)
    created = [a.id for a in accepted if a.created]
    for chunk in chunks(created):
        self.app.send_task(DISPATCH_TASKS, args=[chunk])
    return {"tasks": [{"id": str(a.id), "status": a.status.value, "tier": a.tier.value} for a in accepted]}


@shared_task(name=DISPATCH_TASKS, bind=True)
def dispatch_tasks(self: CeleryTask, task_ids: list[str]) -> int:
    """Route a chunk of queued tasks: batch-path ones in bulk, one call message per immediate one."""
    ctx = context_of(self.app)
    ids = [uuid.UUID(t) for t in task_ids]
    with ctx.sessions.begin() as session:
        immediate = route_queued_tasks(session, ids, ctx.config, datetime.now(UTC), ctx.prices)
    for task_id in immediate:
        self.app.send_task(CALL_IMMEDIATE, args=[str(task_id)])
    if len(immediate) < len(ids):
        # size trigger: some went to `waiting_batch`; a full group is flushed now, not at the next tick
        self.app.send_task(ASSEMBLE_BATCHES)
        if lane_provider(ctx.config) is not None:
            self.app.send_task(LANE_PUMP)  # or they stayed queued for the background lane
    return len(immediate)


@shared_task(name=CALL_IMMEDIATE, bind=True)
def call_immediate(self: CeleryTask, task_id: str, escalate: bool = False) -> None:
    ctx = context_of(self.app)
    with bound(task_id_var, task_id):
        retry_in = run_immediate_call(ctx, uuid.UUID(task_id), escalate=escalate)
    if retry_in is not None:
        # the row says when it may run again; this message is only the wake-up call
        self.app.send_task(CALL_IMMEDIATE, args=[task_id], countdown=retry_in)


@shared_task(name=ASSEMBLE_BATCHES, bind=True)
def assemble(self: CeleryTask) -> int:
    ctx = context_of(self.app)
    escalate, claimed = assemble_batches(ctx, lambda batch: self.app.send_task(SUBMIT_BATCH, args=[str(batch.id)]))
    for task_id in escalate:
        self.app.send_task(CALL_IMMEDIATE, args=[str(task_id)], kwargs={"escalate": True})
    return len(claimed)


@shared_task(name=SUBMIT_BATCH, bind=True)
def submit(self: CeleryTask, batch_id: str) -> None:
    with bound(batch_id_var, batch_id):  # a batch's many tasks are logged as the batch
        retry_in = submit_batch(context_of(self.app), uuid.UUID(batch_id))
    if retry_in is not None:
        self.app.send_task(SUBMIT_BATCH, args=[batch_id], countdown=retry_in)


@shared_task(name=POLL_BATCHES, bind=True)
def poll(self: CeleryTask) -> int:
    ready = poll_batches(context_of(self.app))
    for batch_id in ready:
        self.app.send_task(INGEST_BATCH, args=[str(batch_id)])
    return len(ready)


@shared_task(name=INGEST_BATCH, bind=True)
def ingest(self: CeleryTask, batch_id: str) -> int:
    def resubmit(new_batch: uuid.UUID, delay: float) -> None:
        self.app.send_task(SUBMIT_BATCH, args=[str(new_batch)], countdown=delay)

    with bound(batch_id_var, batch_id):
        return ingest_batch(context_of(self.app), uuid.UUID(batch_id), resubmit)


@shared_task(name=RECONCILE, bind=True)
def reconcile(self: CeleryTask) -> int:
    ctx = context_of(self.app)
    ids = find_tasks_to_redispatch(ctx)
    for chunk in chunks(ids):
        self.app.send_task(DISPATCH_TASKS, args=[chunk])
        with ctx.sessions.begin() as session:
            mark_dispatched(session, [uuid.UUID(i) for i in chunk])
    with ctx.sessions.begin() as session:
        purged = purge_expired_entries(session)  # response cache: expired answers and dead claims
    to_submit, to_ingest = stale_batches(ctx)
    for batch_id in to_submit:
        self.app.send_task(SUBMIT_BATCH, args=[str(batch_id)])
    for batch_id in to_ingest:
        self.app.send_task(INGEST_BATCH, args=[str(batch_id)])
    count_actions(len(ids), len(to_submit), len(to_ingest), purged)
    if ids or to_submit or to_ingest or purged:
        log.info("reconciler: re-dispatched %d tasks, resumed %d submissions and %d ingestions, purged %d "
                 "expired cache entries", len(ids), len(to_submit), len(to_ingest), purged)
    return len(ids)
