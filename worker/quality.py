"""Shadow comparisons (DESIGN §6, issue 6): the extra call for a sampled task, its comparison, the verdict.

The shadow call is an immediate call on the other tier's primary model (no fallbacks: a comparison with a
different model would say nothing about the one routed to), for urgent and non-urgent tasks alike in
this version (a batch-path shadow is a later step). Its cost is a `shadow` ledger row. A provider error
is recorded as a comparison with `agreed = NULL`, which never counts toward the verdict.
"""

from __future__ import annotations

import logging
import time
import uuid

from celery import current_app, shared_task
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert

from core.ledger import ResponseRecord, add_ledger_entry
from core.messaging import QUALITY_SHADOW
from core.models import QualityComparison, RoutingRule, Task
from core.provider import ChatResult
from core.quality import compare_answers, evaluate, shadow_tier_for
from core.retry import ChainExhausted, call_with_fallbacks
from core.states import Mode, TaskStatus, Tier
from core.tasks import ClaimedTask
from worker.context import WorkerContext, get_worker_context

log = logging.getLogger(__name__)


def maybe_send_shadow(ctx: WorkerContext, claimed: ClaimedTask) -> None:
    """After a task succeeded: send its shadow (or probe) call if it is sampled. Never raises."""
    try:
        with ctx.sessions() as session:
            rule = session.scalar(select(RoutingRule).where(RoutingRule.tenant_id == claimed.tenant_id,
                                                            RoutingRule.task_type == claimed.task_type))
            shadow = shadow_tier_for(ctx.config, Tier(claimed.tier), rule, claimed.id)
        if shadow is not None:
            current_app.send_task(QUALITY_SHADOW, args=[str(claimed.id), shadow.value])
    except Exception:  # quality sampling must never fail the task it samples
        log.warning("task %s: could not send its shadow call", claimed.id, exc_info=True)


def run_shadow(ctx: WorkerContext, task_id: uuid.UUID, shadow_tier: Tier) -> str | None:
    """Call `shadow_tier`'s model for the task, record the comparison, evaluate the rule."""
    with ctx.sessions() as session:
        task = session.get(Task, task_id)
        done = session.scalar(select(QualityComparison.id).where(QualityComparison.task_id == task_id))
        if task is None or task.status is not TaskStatus.SUCCEEDED or done is not None:
            return None
        session.expunge(task)
    ref = ctx.config.tier(shadow_tier).chain[0]
    other_model = task.served_model or task.model or ""
    error: str | None = None
    result: ChatResult | None
    try:
        result = call_with_fallbacks(ctx.providers.chat, [ref], task.request, ctx.config.immediate, time.sleep)
    except ChainExhausted as exhausted:
        result, error = None, str(exhausted)
    light_model, complex_model = ((other_model, ref.model) if shadow_tier is Tier.COMPLEX
                                  else (ref.model, other_model))
    with ctx.sessions.begin() as session:
        row = {"task_id": task_id, "tenant_id": task.tenant_id, "task_type": task.task_type,
               "light_model": light_model, "complex_model": complex_model, "shadow_tier": shadow_tier,
               "agreed": None, "score": None, "error": error}
        if result is not None:
            light, complex_ = ((task.output, result.output) if shadow_tier is Tier.COMPLEX
                               else (result.output, task.output))
            verdict = compare_answers(task.request, light, complex_, ctx.config.quality.similarity_threshold)
            row.update(agreed=verdict.agreed, score=verdict.score, complex_model=complex_model)
        stored = session.scalar(insert(QualityComparison).values(row)
                                .on_conflict_do_nothing(index_elements=["task_id"]).returning(QualityComparison.id))
        if stored is None:
            return None  # another delivery of this message got there first
        if result is not None:
            charge = add_ledger_entry(session, ctx.prices, ResponseRecord(
                tenant_id=task.tenant_id, task_id=task_id, job_id=task.job_id, batch_id=None,
                task_type=task.task_type, tier=shadow_tier, mode=Mode.SHADOW, provider=result.provider,
                requested_model=result.requested_model, served_model=result.served_model, usage=result.usage,
                latency_ms=result.latency_ms))
            if charge.cost_usd is not None:  # DESIGN §12.2: a task's cost is the sum of its ledger rows
                session.execute(update(Task).where(Task.id == task_id)
                                .values(cost_usd=func.coalesce(Task.cost_usd, 0) + charge.cost_usd))
        action = evaluate(session, ctx.config, task.tenant_id, task.task_type)
    if action is not None:
        log.info("quality: %s %s for tenant %s", action, task.task_type, task.tenant_id)
    return action


@shared_task(name=QUALITY_SHADOW)
def quality_shadow(task_id: str, shadow_tier: str) -> None:
    run_shadow(get_worker_context(), uuid.UUID(task_id), Tier(shadow_tier))
