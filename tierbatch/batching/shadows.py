"""Batch-path shadow tasks: the quality monitor's second request of a non-urgent task,
sent through a provider batch at the batch price instead of an immediate call.

A shadow task is a `tasks` row with `shadow_of` set: the same request, on the other tier's primary model,
born `waiting_batch`, in no job, at most one per task (its id is derived from the task's:
tierbatch.base.ids.shadow_task_id, the same month's partition as its task). The batch path treats it like any
Light task (claimed by provider and model, one line per task, retried per line); ingestion bills its line
as a `shadow` ledger row of the task it shadows and adds the cost to that task (tierbatch/batching/ingest.py). Once it
is terminal, `settle_batch_shadows` (worker/quality.py) compares the answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.ids import shadow_task_id
from tierbatch.base.states import TERMINAL_TASK_STATUSES, Tier, sql_in
from tierbatch.db.bulk_sql import QUEUE_SHADOW_TASKS


def takes_batch_shadow(config: AppConfig, shadow_tier: Tier, urgent: bool) -> bool:
    """A non-urgent task's shadow goes through the batch path when the shadow model's provider has one."""
    ref = config.tier(shadow_tier).chain[0]
    return not urgent and config.provider(ref.provider).batch


def queue_batch_shadows(session: Session, config: AppConfig, picks: Sequence[tuple[uuid.UUID, Tier]]) -> int:
    """Shadow tasks for (task id, shadow tier) pairs, `waiting_batch` on the shadow tier's primary model;
    a task that already has one gets none (redelivery). Returns how many were created."""
    if not picks:
        return 0
    refs = [config.tier(tier).chain[0] for _, tier in picks]
    result = session.execute(QUEUE_SHADOW_TASKS, {
        "ids": [task_id for task_id, _ in picks], "shadow_ids": [shadow_task_id(task_id) for task_id, _ in picks],
        "tiers": [tier.value for _, tier in picks],
        "kinds": ["shadow" if tier is Tier.COMPLEX else "probe" for _, tier in picks],
        "providers": [ref.provider for ref in refs], "models": [ref.model for ref in refs]})
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True, slots=True)
class FinishedShadow:
    """A terminal shadow task beside the task it shadows, not compared yet."""

    shadow_id: uuid.UUID
    task_id: uuid.UUID
    tenant_id: uuid.UUID
    task_type: str
    shadow_tier: Tier
    succeeded: bool
    shadow_output: str | None
    shadow_model: str
    shadow_error: str | None
    task_output: str | None
    task_model: str
    request: dict[str, Any]


_FINISHED_SHADOWS = text(
    "SELECT s.id AS shadow_id, o.id AS task_id, o.tenant_id, o.task_type, s.tier AS shadow_tier,"
    " s.status = 'succeeded' OR (s.status = 'failed' AND s.response IS NOT NULL) AS answered, s.output,"
    " coalesce(s.served_model, s.model) AS shadow_model, s.status::text AS status, s.error, o.output AS task_output,"
    " coalesce(o.served_model, o.model, '') AS task_model, o.request "
    "FROM tasks AS s JOIN tasks AS o ON o.id = s.shadow_of "
    "WHERE s.batch_id = :batch AND s.shadow_of IS NOT NULL AND s.status IN "
    + sql_in(TERMINAL_TASK_STATUSES) +
    " AND NOT EXISTS (SELECT 1 FROM quality_comparisons AS q WHERE q.task_id = o.id)"
)


def finished_batch_shadows(session: Session, batch_id: uuid.UUID) -> list[FinishedShadow]:
    """The shadow tasks of a provider batch that are terminal and whose comparison is not recorded yet
    (read through the batch's own index: bounded by the batch, not by every shadow ever made)."""
    return [FinishedShadow(row.shadow_id, row.task_id, row.tenant_id, row.task_type, Tier(row.shadow_tier),
                           bool(row.answered), row.output, row.shadow_model or "",
                           None if row.answered else (row.error or f"shadow task {row.status}"),
                           row.task_output, row.task_model, row.request)
            for row in session.execute(_FINISHED_SHADOWS, {"batch": batch_id})]
