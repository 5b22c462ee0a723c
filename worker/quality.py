"""Shadow comparisons: the extra call for a sampled task, its comparison, the verdict.

Where sampling happens:
- immediate tasks: `maybe_send_shadow`, after the call's result is recorded (worker/immediate.py);
- gateway calls (`/v1/chat/completions`): `sample_gateway_calls`, for the ids the API sends about once a
  second after their records commit (tierbatch/gateway/sampling.py);
- batch-path tasks: `send_batch_shadows`, after an ingest chunk commits (worker/batch.py). The sample is
  chosen by the hash of each task's request: the statement that reads the chunk's requests before it is
  written also names the tasks that may be sampled (`tierbatch.tasks.sample_points`), then
  `shadow_tier_for` decides with one query for their draws and one for the rules of their (tenant, task
  type) pairs, so a batch of 50,000 lines costs a few statements per chunk, and no query per task.

The shadow runs on the other tier's primary model only (no fallbacks: a comparison with a different model
would say nothing about the one routed to). Its cost is a `shadow` ledger row, added to the task's cost.
A provider error is recorded as a comparison with `agreed = NULL`, which never counts toward the verdict.
One comparison per task (unique `task_id`): a second delivery records nothing.

Which path a shadow takes: an urgent task's shadow is an immediate call on the other tier's
primary model (a `QUALITY_SHADOW` message). A non-urgent task's shadow goes through the batch path as a
shadow task (tierbatch/batching/shadows.py), at the batch price: it is claimed, submitted and ingested like any batch
line, billed as a `shadow` row of the task it shadows, and compared by `settle_batch_shadows` once the
batch is ingested. The verdict then comes one batch turnaround later, which is what non-urgent means.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Task as CeleryTask
from celery import current_app, shared_task
from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from tierbatch.base.errors import ChainExhausted
from tierbatch.base.messaging import QUALITY_SHADOW, SAMPLE_GATEWAY_CALLS
from tierbatch.base.states import Mode, TaskStatus, Tier
from tierbatch.batching.ingest import SucceededTask
from tierbatch.batching.shadows import finished_batch_shadows, queue_batch_shadows, takes_batch_shadow
from tierbatch.db.models import QualityComparison, RoutingRule, Task
from tierbatch.ledger.rows import ResponseRecord, add_ledger_entry
from tierbatch.metrics.catalog import SHADOW_COMPARISONS, known_task_types, task_type_label
from tierbatch.metrics.commit import after_commit
from tierbatch.providers.adapter import ChatResult
from tierbatch.providers.retry import call_with_fallbacks
from tierbatch.quality.monitor import compare_answers, evaluate, may_shadow, sample_points, shadow_tier_for
from tierbatch.tasks.store import ClaimedTask
from tierbatch.worker.context import WorkerContext, context_of
from tierbatch.worker.errors import task_error

log = logging.getLogger(__name__)


def _dispatch_shadows(ctx: WorkerContext, picks: Sequence[tuple[uuid.UUID, Tier, bool]]) -> int:
    """(task id, shadow tier, urgent) → shadow tasks on the batch path for the non-urgent ones, a
    `QUALITY_SHADOW` message for the others. Returns how many shadows were started."""
    batched = [(task_id, tier) for task_id, tier, urgent in picks if takes_batch_shadow(ctx.config, tier, urgent)]
    immediate = [(task_id, tier) for task_id, tier, urgent in picks if not takes_batch_shadow(ctx.config, tier, urgent)]
    started = 0
    if batched:
        with ctx.sessions.begin() as session:
            started += queue_batch_shadows(session, ctx.config, batched)
    if immediate:
        with current_app.producer_or_acquire() as producer:  # one broker connection for all of them
            for task_id, tier in immediate:
                current_app.send_task(QUALITY_SHADOW, args=[str(task_id), tier.value], producer=producer)
        started += len(immediate)
    return started


def maybe_send_shadow(ctx: WorkerContext, claimed: ClaimedTask) -> None:
    """After a task succeeded: start its shadow (or probe) if it is sampled. Never raises."""
    if not may_shadow(ctx.config, Tier(claimed.tier)):
        return  # at a rate of 0 no task is sampled: no queries
    try:
        with ctx.sessions() as session:
            rule = session.scalar(select(RoutingRule).where(RoutingRule.tenant_id == claimed.tenant_id,
                                                            RoutingRule.task_type == claimed.task_type))
            points = sample_points(session, [claimed.id]).get(claimed.id)
        shadow = shadow_tier_for(ctx.config, Tier(claimed.tier), rule, points) if points is not None else None
        if shadow is not None:
            _dispatch_shadows(ctx, [(claimed.id, shadow, claimed.urgent)])
    except Exception:  # quality sampling must never fail the task it samples
        log.warning("task %s: could not start its shadow", claimed.id, exc_info=True)


def _start_sampled(ctx: WorkerContext, tasks: Sequence[tuple[uuid.UUID, uuid.UUID, str, Tier, bool]]) -> int:
    """(id, tenant, task type, tier, urgent) of finished tasks → the shadows (or probes) of the sampled
    ones started: their draws read in one query, the rules of their (tenant, task type) pairs in another."""
    pairs = {(tenant_id, task_type) for _, tenant_id, task_type, _, _ in tasks}
    if not pairs:
        return 0
    with ctx.sessions() as session:
        rules = {(rule.tenant_id, rule.task_type): rule for rule in session.scalars(
            select(RoutingRule).where(tuple_(RoutingRule.tenant_id, RoutingRule.task_type).in_(pairs)))}
        points = sample_points(session, [task_id for task_id, _, _, _, _ in tasks])
    picks = [(task_id, shadow, urgent) for task_id, tenant_id, task_type, tier, urgent in tasks if task_id in points
             and (shadow := shadow_tier_for(ctx.config, tier, rules.get((tenant_id, task_type)), points[task_id]))]
    return _dispatch_shadows(ctx, picks) if picks else 0


def send_batch_shadows(ctx: WorkerContext, succeeded: Sequence[SucceededTask]) -> int:
    """After an ingest chunk committed: start the shadows (or probes) of its sampled successes.

    `succeeded` are the chunk's tasks that ingestion named as candidates (`PreparedChunk.watch`) and the chunk moved to
    `succeeded` (never shadow tasks themselves). They are batch-path tasks, so not urgent: their shadows
    are shadow tasks, created in one statement. Returns the number started. Never raises: sampling must
    not fail the ingestion."""
    try:
        return _start_sampled(ctx, [(task.id, task.tenant_id, task.task_type, task.tier, False)
                                    for task in succeeded])
    except Exception:  # quality sampling must never fail the ingestion it samples
        log.warning("could not start the shadows of %d batch results", len(succeeded), exc_info=True)
        return 0


def sample_gateway_calls(ctx: WorkerContext, task_ids: Sequence[uuid.UUID]) -> int:
    """Calls the API answered and recorded (`tierbatch.gateway.sampling`): the shadows (or probes) of the
    sampled ones started, as for a task of the immediate path. Only succeeded, immediate, non-shadow tasks
    are looked at (a message naming anything else starts nothing); returns the number started."""
    with ctx.sessions() as session:
        rows = session.execute(select(Task.id, Task.tenant_id, Task.task_type, Task.tier, Task.urgent).where(
            Task.id.in_(task_ids), Task.status == TaskStatus.SUCCEEDED, Task.mode == Mode.IMMEDIATE,
            Task.shadow_of.is_(None))).all()
    return _start_sampled(ctx, [(row.id, row.tenant_id, row.task_type, Tier(row.tier), bool(row.urgent))
                                for row in rows])


def record_comparison(session: Session, ctx: WorkerContext, *, task_id: uuid.UUID, tenant_id: uuid.UUID,
                      task_type: str, request: dict[str, Any], task_output: str | None, task_model: str,
                      shadow_tier: Tier, shadow_output: str | None, shadow_model: str, error: str | None) -> bool:
    """Store the comparison of a task's answer with its shadow's (an error: `agreed` NULL, never counted).
    False if the task already has one (another delivery got there first)."""
    light_model, complex_model = ((task_model, shadow_model) if shadow_tier is Tier.COMPLEX
                                  else (shadow_model, task_model))
    row: dict[str, Any] = {"task_id": task_id, "tenant_id": tenant_id, "task_type": task_type,
                           "light_model": light_model, "complex_model": complex_model, "shadow_tier": shadow_tier,
                           "agreed": None, "score": None, "error": error}
    if error is None:
        light, complex_ = ((task_output, shadow_output) if shadow_tier is Tier.COMPLEX
                           else (shadow_output, task_output))
        verdict = compare_answers(request, light, complex_, ctx.config.quality.similarity_threshold)
        row.update(agreed=verdict.agreed, score=verdict.score)
    stored = session.scalar(insert(QualityComparison).values(row)
                            .on_conflict_do_nothing(index_elements=["task_id"]).returning(QualityComparison.id))
    if stored is not None:
        verdict_label = "error" if row["agreed"] is None else "agreed" if row["agreed"] else "disagreed"
        label = task_type_label(known_task_types(ctx.config), task_type)
        after_commit(session, lambda: SHADOW_COMPARISONS.labels(label, verdict_label).inc())
    return stored is not None


def run_shadow(ctx: WorkerContext, task_id: uuid.UUID, shadow_tier: Tier) -> str | None:
    """Call `shadow_tier`'s model for the task now, record the comparison, evaluate the rule."""
    with ctx.sessions() as session:
        task = session.get(Task, task_id)
        done = session.scalar(select(QualityComparison.id).where(QualityComparison.task_id == task_id))
        if task is None or task.status is not TaskStatus.SUCCEEDED or done is not None:
            return None
        session.expunge(task)
    ref = ctx.config.tier(shadow_tier).chain[0]
    error: str | None = None
    result: ChatResult | None
    try:
        result = call_with_fallbacks(ctx.providers.chat_for(task.task_type, task.tenant_id), [ref], task.request,
                                     ctx.config.immediate, time.sleep)
    except ChainExhausted as exhausted:
        result, error = None, task_error(exhausted)
    with ctx.sessions.begin() as session:
        stored = record_comparison(
            session, ctx, task_id=task_id, tenant_id=task.tenant_id, task_type=task.task_type, request=task.request,
            task_output=task.output, task_model=task.served_model or task.model or "", shadow_tier=shadow_tier,
            shadow_output=result.output if result else None, shadow_model=ref.model, error=error)
        if not stored:
            return None
        if result is not None:
            charge = add_ledger_entry(session, ctx.prices, ResponseRecord(
                tenant_id=task.tenant_id, task_id=task_id, job_id=task.job_id, batch_id=None,
                task_type=task.task_type, tier=shadow_tier, mode=Mode.SHADOW, provider=result.provider,
                requested_model=result.requested_model, served_model=result.served_model, usage=result.usage,
                latency_ms=result.latency_ms))
            if charge.cost_usd is not None:  # no double billing: a task's cost is the sum of its ledger rows
                session.execute(update(Task).where(Task.id == task_id)
                                .values(cost_usd=func.coalesce(Task.cost_usd, 0) + charge.cost_usd))
        action = evaluate(session, ctx.config, task.tenant_id, task.task_type)
    if action is not None:
        log.info("quality: %s %s for tenant %s", action, task.task_type, task.tenant_id)
    return action


def settle_batch_shadows(ctx: WorkerContext, batch_id: uuid.UUID) -> int:
    """After a provider batch is ingested: compare the answers of its finished shadow tasks (their cost is
    already billed by ingestion), then evaluate each task type once. Returns the comparisons recorded."""
    with ctx.sessions.begin() as session:
        finished = finished_batch_shadows(session, batch_id)
        recorded = 0
        for shadow in finished:
            recorded += record_comparison(
                session, ctx, task_id=shadow.task_id, tenant_id=shadow.tenant_id, task_type=shadow.task_type,
                request=shadow.request, task_output=shadow.task_output, task_model=shadow.task_model,
                shadow_tier=shadow.shadow_tier, shadow_output=shadow.shadow_output,
                shadow_model=shadow.shadow_model, error=shadow.shadow_error)
        actions = {(s.tenant_id, s.task_type): evaluate(session, ctx.config, s.tenant_id, s.task_type)
                   for s in {(f.tenant_id, f.task_type): f for f in finished}.values()}
    for (tenant_id, task_type), action in actions.items():
        if action is not None:
            log.info("quality: %s %s for tenant %s", action, task_type, tenant_id)
    return recorded


@shared_task(name=SAMPLE_GATEWAY_CALLS, bind=True)
def quality_sample_gateway_calls(self: CeleryTask, task_ids: list[str]) -> int:
    return sample_gateway_calls(context_of(self.app), [uuid.UUID(task_id) for task_id in task_ids])


@shared_task(name=QUALITY_SHADOW, bind=True)
def quality_shadow(self: CeleryTask, task_id: str, shadow_tier: str) -> None:
    run_shadow(context_of(self.app), uuid.UUID(task_id), Tier(shadow_tier))
