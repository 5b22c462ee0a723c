"""Task storage, routing and the steps of the immediate path.

Status changes go through tierbatch.tasks.transitions (guarded, raising TransitionError when no row moved);
here a lost race turns into None/False where the caller only needs to know whether it won. Nothing
here commits: the caller owns the transaction, so a state change and its ledger row land together.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BindParameter,
    ColumnElement,
    any_,
    bindparam,
    func,
    literal,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import NotFound, TransitionError
from tierbatch.base.ids import Clock, new_task_ids
from tierbatch.base.states import Mode, TaskStatus, Tier
from tierbatch.cache.responses import CachedAnswer, cache_key, maybe_cacheable, take_hits, wants_cache
from tierbatch.costs.budgets import apply_budget
from tierbatch.db.engine import newest_first_page
from tierbatch.db.models import Task, TaskIdempotencyKey
from tierbatch.ledger.pricing import PriceBook
from tierbatch.ledger.rows import Charge, ResponseRecord, add_ledger_entry
from tierbatch.providers.adapter import ChatResult
from tierbatch.routing.rules import RuleView, rule_decision, tenant_rules
from tierbatch.routing.tiers import resolve_tier, takes_background_lane, takes_batch_path
from tierbatch.tasks import transitions
from tierbatch.tasks.labels import label_error
from tierbatch.tasks.submission import TaskSpec


@dataclass(frozen=True, slots=True)
class AcceptedTask:
    id: uuid.UUID
    status: TaskStatus
    tier: Tier
    created: bool  # False when an idempotency key matched an existing task


def _task_row(task_id: uuid.UUID, tenant_id: uuid.UUID, spec: TaskSpec, config: AppConfig,
              job_id: uuid.UUID | None, item_id: str | None,
              rules: Mapping[str, RuleView] | None = None) -> dict[str, Any]:
    messages = spec.chat_messages()
    # quality-aware routing: the tenant's rule for the task type comes before config routing
    decision = (rule_decision(rules or {}, spec.tier, spec.task_type)
                or resolve_tier(config, spec.tier, spec.task_type, messages))
    return {
        "id": task_id, "tenant_id": tenant_id, "job_id": job_id, "item_id": item_id,
        "idempotency_key": spec.idempotency_key, "task_type": spec.task_type,
        "requested_tier": spec.tier, "tier": decision.tier, "tier_reason": decision.reason,
        "urgent": spec.urgent, "deadline": spec.deadline, "request": spec.provider_request(),
        "metadata": spec.metadata, "status": TaskStatus.QUEUED, "attempts": 0,
    }


def _claim_keys(session: Session, tenant_id: uuid.UUID, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Record the rows' idempotency keys for their tasks (in the caller's transaction, with the tasks);
    returns the keys won. A key already taken is not won, unless its task is gone (its month dropped by
    retention, tierbatch/tasks/partitions.py): then the new task takes it. A concurrent request with the
    same key waits here for the other's commit (the primary key), then loses to it."""
    keyed = [{"tenant_id": tenant_id, "idempotency_key": r["idempotency_key"], "task_id": r["id"]}
             for r in rows if r["idempotency_key"] is not None]
    if not keyed:
        return set()
    statement = insert(TaskIdempotencyKey).values(keyed)
    statement = statement.on_conflict_do_update(
        index_elements=["tenant_id", "idempotency_key"], set_={"task_id": statement.excluded.task_id},
        where=text("NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.id = task_idempotency_keys.task_id)"))
    return set(session.scalars(statement.returning(TaskIdempotencyKey.idempotency_key)))


def insert_tasks(session: Session, tenant_id: uuid.UUID, specs: Sequence[TaskSpec], config: AppConfig,
                 job_id: uuid.UUID | None = None, clock: Clock = time.time) -> list[AcceptedTask]:
    """Store tasks as `queued`; a repeated idempotency key returns the task it already names. `clock`
    makes the ids (tierbatch.base.ids)."""
    rows: list[dict[str, Any]] = []
    first_by_key: dict[str, int] = {}
    order: list[int | str] = []  # per spec: index into rows, or an idempotency key seen earlier
    rules = tenant_rules(session, tenant_id) if specs else {}  # one query per request
    ids = iter(new_task_ids(len(specs), clock))
    for spec in specs:
        key = spec.idempotency_key
        if key is not None and key in first_by_key:
            order.append(key)
            continue
        if key is not None:
            first_by_key[key] = len(rows)
        order.append(len(rows))
        rows.append(_task_row(next(ids), tenant_id, spec, config, job_id, None, rules))

    apply_budget(session, tenant_id, rows, config)  # budgets: 402, or complex stored as light

    won = _claim_keys(session, tenant_id, rows)
    new_rows = [r for r in rows if r["idempotency_key"] is None or r["idempotency_key"] in won]
    if new_rows:
        session.execute(insert(Task).values(new_rows))
    inserted = {r["id"] for r in new_rows}

    existing: dict[str, Task] = {}
    keys_lost = [r["idempotency_key"] for r in rows if r["id"] not in inserted]
    if keys_lost:
        for key, task in session.execute(
                select(TaskIdempotencyKey.idempotency_key, Task).join(Task, Task.id == TaskIdempotencyKey.task_id)
                .where(TaskIdempotencyKey.tenant_id == tenant_id, TaskIdempotencyKey.idempotency_key.in_(keys_lost))):
            existing[key] = task

    def accepted_for(row: dict[str, Any]) -> AcceptedTask:
        if row["id"] in inserted:
            return AcceptedTask(row["id"], TaskStatus.QUEUED, row["tier"], True)
        task = existing[row["idempotency_key"]]
        return AcceptedTask(task.id, task.status, task.tier, False)

    results = []
    for entry in order:
        row = rows[first_by_key[entry]] if isinstance(entry, str) else rows[entry]
        results.append(accepted_for(row))
    return results


def _uuid_array(ids: Sequence[uuid.UUID]) -> BindParameter[Any]:
    array_type: Any = ARRAY(PG_UUID(as_uuid=True))
    return bindparam("ids_" + uuid.uuid4().hex[:8], value=list(ids), type_=array_type)


def route_queued_tasks(session: Session, task_ids: Sequence[uuid.UUID], config: AppConfig,
                       now: datetime, prices: PriceBook | None = None) -> list[uuid.UUID]:
    """Answer cached requests, send Light non-urgent tasks to `waiting_batch` (or leave them queued for
    the background lane, `tierbatch.tasks.lane`, when the light provider has no Batch API); return the ids
    due for an immediate call. With `prices`, the response cache is consulted.

    Only tasks still `queued` and past their `not_before` are routed, so running this twice is harmless.
    """
    if not task_ids:
        return []
    ids = _uuid_array(task_ids)  # one array parameter, not one bound parameter per task
    use_cache = prices is not None and config.cache.enabled
    # the cache prefilter rides along in the same query: only flagged tasks are read again and hashed
    flag = maybe_cacheable(config.cache) if use_cache else literal(False)
    candidates = session.execute(
        select(Task.id, Task.tier, Task.urgent, Task.deadline, flag.label("maybe_cacheable"))
        .where(Task.id == any_(ids), Task.status == TaskStatus.QUEUED,
               or_(Task.not_before.is_(None), Task.not_before <= func.now()))
        .with_for_update(skip_locked=True)
    ).all()
    flagged = [c.id for c in candidates if c.maybe_cacheable]
    if flagged and prices is not None:
        answered = answer_queued_from_cache(session, flagged, config, prices)
        candidates = [c for c in candidates if c.id not in answered]
    batch_path = {c.id for c in candidates if takes_batch_path(config, c.tier, c.urgent, c.deadline, now)}
    lane = {c.id for c in candidates if c.id not in batch_path and takes_background_lane(config, c.tier, c.urgent)}
    dispatched = [c.id for c in candidates if c.id not in batch_path]
    if batch_path:
        light = config.tiers["light"]
        transitions.move_to_batch_path(session, list(batch_path), light.provider, light.model)
    if dispatched:
        # lane tasks stay queued, now dispatched: the lane's pump claims them at its pace
        session.execute(update(Task).where(Task.id == any_(_uuid_array(dispatched))).values(dispatched_at=func.now()),
                        execution_options={"synchronize_session": False})
    return [task_id for task_id in dispatched if task_id not in lane]


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    id: uuid.UUID
    lease_token: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    task_type: str
    tier: Tier
    request: dict[str, Any]
    attempts: int
    metadata: dict[str, str] = field(default_factory=dict)
    urgent: bool = True


def claim_for_immediate_call(session: Session, task_id: uuid.UUID, lease_seconds: float, *,
                             escalate: bool = False) -> ClaimedTask | None:
    """queued → running under a fresh lease; None if the task is not (or not yet) claimable.

    With `escalate`, a task waiting for or sitting in a batch is claimed instead (its deadline can no
    longer be met by the batch path); a later result of its batch line is then ignored.
    """
    token = uuid.uuid4()
    try:
        row = transitions.claim_for_call(session, task_id, token, lease_seconds, escalate=escalate)
    except TransitionError:
        return None
    return ClaimedTask(task_id, token, row.tenant_id, row.job_id, row.task_type, row.tier, row.request,
                       row.attempts, row.task_metadata or {}, row.urgent)


# --- response cache ----------------------------------------------------------------------------------


def answer_queued_from_cache(session: Session, task_ids: Sequence[uuid.UUID], config: AppConfig,
                             prices: PriceBook) -> set[uuid.UUID]:
    """queued → succeeded (mode `cache`) for the tasks (locked by the caller) whose request has a live
    cached answer."""
    rows = session.execute(
        select(Task.id, Task.tenant_id, Task.job_id, Task.task_type, Task.tier, Task.request, Task.task_metadata)
        .where(Task.id == any_(_uuid_array(task_ids)), Task.status == TaskStatus.QUEUED)
    ).all()
    keyed = [(row, (row.tenant_id, cache_key(config.tier(row.tier).model, row.request))) for row in rows
             if wants_cache(config.cache, row.task_type, row.request, row.task_metadata)]
    hits = take_hits(session, [pair for _, pair in keyed])
    found = [(CacheTarget(row.id, row.tenant_id, row.job_id, row.task_type, row.tier), hits[pair])
             for row, pair in keyed if pair in hits]
    if not found:
        return set()
    # one statement for every hit of the chunk (a bulk path: no round trip per task), then their ledger rows
    values = [{"id": target.id, "provider": answer.provider, "model": answer.requested_model,
               "served_model": answer.served_model, "output": answer.output, "response": answer.response,
               "input_tokens": answer.usage.input_tokens, "cached_tokens": answer.usage.cached_tokens,
               "output_tokens": answer.usage.output_tokens, "reasoning_tokens": answer.usage.reasoning_tokens,
               "baseline_cost_usd": prices.baseline(answer.usage)} for target, answer in found]
    answered = transitions.succeed_queued_from_cache(session, json.dumps(values, default=str))
    for target, answer in found:
        if target.id in answered:
            add_ledger_entry(session, prices, _cache_record(target, answer))
    return answered


def _cache_record(task: CacheTarget | ClaimedTask, answer: CachedAnswer) -> ResponseRecord:
    return ResponseRecord(
        tenant_id=task.tenant_id, task_id=task.id, job_id=task.job_id, batch_id=None, task_type=task.task_type,
        tier=task.tier, mode=Mode.CACHE, provider=answer.provider, requested_model=answer.requested_model,
        served_model=answer.served_model, usage=answer.usage)


@dataclass(frozen=True, slots=True)
class CacheTarget:
    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    task_type: str
    tier: Tier


def finish_from_cache(session: Session, task: ClaimedTask, answer: CachedAnswer, prices: PriceBook) -> Charge | None:
    """running → succeeded, mode `cache`, with its ledger row (cost 0, baseline kept); None if the lease
    was lost."""
    try:
        transitions.succeed_running_from_cache(session, task.id, task.lease_token)
    except TransitionError:
        return None
    usage = answer.usage
    charge = add_ledger_entry(session, prices, _cache_record(task, answer))
    session.execute(update(Task).where(Task.id == task.id).values(
        provider=answer.provider, model=answer.requested_model, served_model=answer.served_model,
        output=answer.output, response=answer.response, input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens, output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens, cost_usd=charge.cost_usd,
        baseline_cost_usd=charge.baseline_cost_usd))
    return charge


def renew_lease(session: Session, task_id: uuid.UUID, token: uuid.UUID, lease_seconds: float) -> bool:
    moved = session.execute(
        update(Task).where(Task.id == task_id, Task.status == TaskStatus.RUNNING, Task.lease_token == token)
        .values(lease_expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds))
        .returning(Task.id)
    ).first()
    return moved is not None


def record_immediate_success(session: Session, claimed: ClaimedTask, result: ChatResult, prices: PriceBook
                             ) -> Charge | None:
    """running → succeeded with its ledger row; None if the lease was lost (result discarded)."""
    record = ResponseRecord(
        tenant_id=claimed.tenant_id, task_id=claimed.id, job_id=claimed.job_id, batch_id=None,
        task_type=claimed.task_type, tier=claimed.tier, mode=Mode.IMMEDIATE, provider=result.provider,
        requested_model=result.requested_model, served_model=result.served_model, usage=result.usage,
        latency_ms=result.latency_ms,
    )
    # a labelled request whose answer is not a label is billed (the provider served it) but fails
    problem = label_error(claimed.request, result.output)
    try:
        transitions.succeed_running(session, claimed.id, claimed.lease_token, problem)
    except TransitionError:
        return None
    charge = add_ledger_entry(session, prices, record)
    usage = result.usage
    session.execute(
        update(Task).where(Task.id == claimed.id).values(
            provider=result.provider, model=result.requested_model, served_model=result.served_model,
            output=result.output, response=result.body, input_tokens=usage.input_tokens,
            cached_tokens=usage.cached_tokens, output_tokens=usage.output_tokens,
            reasoning_tokens=usage.reasoning_tokens, cost_usd=charge.cost_usd,
            baseline_cost_usd=charge.baseline_cost_usd,
        )
    )
    return charge


def requeue_running_task(session: Session, claimed: ClaimedTask, error: str, delay_seconds: float) -> bool:
    """running → queued after a retryable failure, not to be claimed before the delay."""
    try:
        transitions.requeue(session, claimed.id, claimed.lease_token, error, delay_seconds)
    except TransitionError:
        return False
    return True


def fail_running_task(session: Session, claimed: ClaimedTask, error: str) -> bool:
    try:
        transitions.fail_running(session, claimed.id, claimed.lease_token, error)
    except TransitionError:
        return False
    return True


def cancel_task(session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID) -> Task:
    """queued / waiting_batch → cancelled. Raises NotFound, or TransitionError if it already started."""
    try:
        return transitions.cancel(session, tenant_id, task_id)
    except TransitionError:
        pass
    task = get_task(session, tenant_id, task_id)
    raise TransitionError(f"task {task_id} is {task.status.value} and can no longer be cancelled")


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    """The immediate queue holds messages now; it was last seen empty at `drained_at` (the database's
    clock), so a call sent after that may still be waiting there."""

    drained_at: datetime
    wait_seconds: float


def stale_queued_task_ids(session: Session, older_than_seconds: float, limit: int = 10_000, *,
                          exclude: ColumnElement[bool] | None = None, backlog: QueueBacklog | None = None
                          ) -> list[uuid.UUID]:
    """Queued tasks whose dispatch message may have been lost (Redis restart, crash before sending);
    `exclude`: tasks queued on purpose (the background lane's backlog, `tierbatch.tasks.lane.lane_members`);
    `backlog`: the immediate queue holds messages now, and a task dispatched since it was last seen empty
    is left alone (its call may be waiting there) until it has waited `backlog.wait_seconds`."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds)
    query = select(Task.id).where(
        Task.status == TaskStatus.QUEUED,
        or_(Task.dispatched_at.is_(None), Task.dispatched_at < cutoff),
        or_(Task.not_before.is_(None), Task.not_before <= func.now()),
        Task.created_at < cutoff,
    )
    if exclude is not None:
        query = query.where(not_(exclude))
    if backlog is not None:
        query = query.where(or_(
            Task.dispatched_at.is_(None), Task.dispatched_at < backlog.drained_at,
            Task.dispatched_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, backlog.wait_seconds)))
    return list(session.scalars(query.limit(limit)))


def mark_dispatched(session: Session, task_ids: Sequence[uuid.UUID]) -> None:
    if task_ids:
        session.execute(update(Task).where(Task.id.in_(task_ids)).values(dispatched_at=func.now()))


def get_task(session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID) -> Task:
    task = session.scalar(select(Task).where(Task.id == task_id, Task.tenant_id == tenant_id,
                                             Task.shadow_of.is_(None)))
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def list_tasks(session: Session, tenant_id: uuid.UUID, *, limit: int, after: tuple[datetime, uuid.UUID] | None,
               job_id: uuid.UUID | None = None, status: TaskStatus | None = None,
               task_type: str | None = None) -> list[Task]:
    """Newest first, keyset-paginated on (created_at, id); returns up to limit + 1 rows."""
    query = select(Task).where(Task.tenant_id == tenant_id, Task.shadow_of.is_(None))  # not the monitor's
    if job_id is not None:
        query = query.where(Task.job_id == job_id)
    if status is not None:
        query = query.where(Task.status == status)
    if task_type is not None:
        query = query.where(Task.task_type == task_type)
    return newest_first_page(session, query, Task, limit=limit, after=after)
