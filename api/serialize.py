"""Wire shapes of our objects in the HTTP API. Money goes out as decimal strings."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from tierbatch.base.states import TaskStatus
from tierbatch.db.models import Task


def money(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def task_body(task: Task) -> dict[str, Any]:
    usage = None
    if task.input_tokens is not None:
        usage = {"input_tokens": task.input_tokens, "cached_tokens": task.cached_tokens,
                 "output_tokens": task.output_tokens, "reasoning_tokens": task.reasoning_tokens}
    return {
        "id": str(task.id), "object": "task", "status": task.status.value, "tier": task.tier.value,
        "tier_reason": task.tier_reason, "task_type": task.task_type, "urgent": task.urgent,
        "deadline": timestamp(task.deadline),
        "mode": task.mode.value if task.mode and task.status != TaskStatus.QUEUED else None,
        "model": task.model, "served_model": task.served_model, "provider": task.provider,
        "job_id": str(task.job_id) if task.job_id else None, "item_id": task.item_id,
        "metadata": task.task_metadata,
        "output": task.output, "response": task.response, "usage": usage,
        "cost_usd": money(task.cost_usd), "baseline_cost_usd": money(task.baseline_cost_usd),
        "attempts": task.attempts, "error": task.error,
        "created_at": timestamp(task.created_at), "started_at": timestamp(task.started_at),
        "finished_at": timestamp(task.finished_at),
        # retention: when output, response and the prompt were removed; null while they are kept
        "bodies_removed_at": timestamp(task.bodies_removed_at),
    }
