"""Shadow comparisons (DESIGN §6, issue 6): the extra call for a sampled task, its comparison, the verdict.

Where sampling happens:
- immediate tasks: `maybe_send_shadow`, after the call's result is recorded (worker/immediate.py);
- batch-path tasks: `send_batch_shadows`, after an ingest chunk commits (worker/batch.py). The sample is
  chosen in Python by task id (`core.quality.may_be_sampled`, then `shadow_tier_for` with one rule query per
  chunk for its (tenant, task type) pairs), so a batch of 50,000 lines costs a message per *sampled* task
  only, and no query per task.

The shadow call is an immediate call on the other tier's primary model (no fallbacks: a comparison with a
different model would say nothing about the one routed to). Its cost is a `shadow` ledger row, added to
the task's cost. A provider error is recorded as a comparison with `agreed = NULL`, which never counts
toward the verdict. One comparison per task (unique `task_id`): a second delivery records nothing.

Why a non-urgent task's shadow is an immediate call and not a line in a provider batch (DESIGN §6 says
"through the batch path when non-urgent"; this version does not, on purpose):
- the batch path is built on `tasks` rows: assembly claims tasks in `waiting_batch` grouped by
  (provider, model) with `custom_id` = task id, and ingestion moves that task to its result and bills a
  `batch` row. A shadow is a second request of a task that has already succeeded, on another model: it
  would need a claim state of its own (a new table or columns: a migration), its own `custom_id`
  namespace, a line builder that reads it and an ingestion branch that writes a comparison and a `shadow`
  row instead of a result; that is claim_batch, write_batch_file, classify_lines and the ingest SQL, the
  parts that carry the §4 invariants (no claim submitted twice, one billed row per line), for a side
  stream of a few percent;
- verdict latency: a batched shadow comes back one more batch turnaround after the task (up to the
  provider's 24 h window), so a task type with a poor cheap model would be promoted a day later still.
The price of the choice: the shadow pays the complex model's immediate price, not the batch price (at the
default 5% shadow rate, about 2.5% of the complex price per Light task). The hook for a batched shadow
would be `send_batch_shadows`: it already knows the sampled tasks of each ingested chunk.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from celery import current_app, shared_task
from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert

from core.batches import SucceededTask
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


def send_batch_shadows(ctx: WorkerContext, succeeded: Sequence[SucceededTask]) -> int:
    """After an ingest chunk committed: send the shadow (or probe) calls of its sampled successes.

    `succeeded` are the chunk's tasks that `may_be_sampled` let through and the chunk moved to
    `succeeded`; the rules of their (tenant, task type) pairs are read in one query. Returns the number
    of messages sent. Never raises: sampling must not fail the ingestion."""
    try:
        pairs = {(task.tenant_id, task.task_type) for task in succeeded}
        if not pairs:
            return 0
        with ctx.sessions() as session:
            rules = {(rule.tenant_id, rule.task_type): rule for rule in session.scalars(
                select(RoutingRule).where(tuple_(RoutingRule.tenant_id, RoutingRule.task_type).in_(pairs)))}
            shadows = [(task.id, tier) for task in succeeded
                       if (tier := shadow_tier_for(ctx.config, task.tier,
                                                   rules.get((task.tenant_id, task.task_type)), task.id))]
        if shadows:
            with current_app.producer_or_acquire() as producer:  # one broker connection for the chunk
                for task_id, tier in shadows:
                    current_app.send_task(QUALITY_SHADOW, args=[str(task_id), tier.value], producer=producer)
        return len(shadows)
    except Exception:  # quality sampling must never fail the ingestion it samples
        log.warning("could not send the shadow calls of %d batch results", len(succeeded), exc_info=True)
        return 0


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
        result = call_with_fallbacks(ctx.providers.chat_for(task.task_type, task.tenant_id), [ref], task.request,
                                     ctx.config.immediate, time.sleep)
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
