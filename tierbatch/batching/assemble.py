"""Assembly: which waiting groups are due, claiming their tasks into a new `preparing` batch, and
which tasks' deadlines the batch path can no longer meet.

Each function takes a session and never commits; the worker owns the transactions. Guards on
`status` and `batch_id` make every step safe to run twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.states import BatchStatus
from tierbatch.db.models import ProviderBatch
from tierbatch.tasks import transitions

# JSONL envelope around each request body, for the byte estimate made while claiming: custom_id,
# method, url (about 140 bytes) and a `prompt_cache_key` of up to 64 characters (about 85 bytes)
_ENVELOPE_BYTES = 225


@dataclass(frozen=True, slots=True)
class Group:
    provider: str
    model: str
    waiting: int
    oldest_age_seconds: float
    approx_bytes: int


def waiting_groups(session: Session) -> list[Group]:
    rows = session.execute(text(
        "SELECT provider, model, count(*) AS waiting, "
        "       extract(epoch FROM now() - min(created_at)) AS age, "
        "       sum(pg_column_size(request)) AS bytes "
        "FROM tasks WHERE status = 'waiting_batch' GROUP BY provider, model"
    )).all()
    return [Group(r.provider, r.model, int(r.waiting), float(r.age or 0), int(r.bytes or 0)) for r in rows]


def group_is_due(config: AppConfig, group: Group) -> bool:
    limits = config.batch
    return (group.waiting >= limits.max_requests or group.approx_bytes >= limits.max_bytes
            or group.oldest_age_seconds >= limits.max_wait_seconds)


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    id: uuid.UUID
    provider: str
    model: str
    request_count: int


def claim_batch(session: Session, config: AppConfig, provider: str, model: str) -> ClaimedBatch | None:
    """Move up to `max_requests` waiting tasks of one (provider, model) into a new `preparing` batch.

    `FOR UPDATE SKIP LOCKED` in the transaction that creates the batch row and links its tasks,
    so two workers never put one task in two batches. A partial group is only flushed once its
    oldest task has waited `max_wait_seconds`.
    """
    limits = config.batch
    locked = session.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"tierbatch.assemble:{provider}/{model}"})
    if not locked:
        return None  # another assembler is working on this group right now
    rows = session.execute(text(
        "SELECT id, octet_length(request::text) AS size, "
        "       extract(epoch FROM now() - created_at) AS age "
        "FROM tasks WHERE status = 'waiting_batch' AND provider = :provider AND model = :model "
        "ORDER BY created_at, id LIMIT :limit FOR UPDATE SKIP LOCKED"
    ), {"provider": provider, "model": model, "limit": limits.max_requests}).all()
    if not rows:
        return None
    budget = int(limits.max_bytes * 0.95)  # the real file must stay under the provider's limit
    chosen: list[uuid.UUID] = []
    total = 0
    for row in rows:
        size = int(row.size) + _ENVELOPE_BYTES + len(model)
        if chosen and total + size > budget:
            break
        chosen.append(row.id)
        total += size
    full = len(chosen) == limits.max_requests or len(chosen) < len(rows)
    oldest = max(float(r.age) for r in rows)
    if not full and oldest < limits.max_wait_seconds:
        return None
    batch_id = uuid.uuid4()
    session.add(ProviderBatch(id=batch_id, provider=provider, model=model, status=BatchStatus.PREPARING,
                              request_count=len(chosen), byte_size=total, attempts=0))
    session.flush()
    transitions.claim_for_batch(session, batch_id, chosen)
    return ClaimedBatch(batch_id, provider, model, len(chosen))


def tasks_to_escalate(session: Session, config: AppConfig, limit: int = 1000) -> list[uuid.UUID]:
    """Tasks whose deadline the batch path can no longer meet.

    Waiting: the group may wait up to `max_wait_seconds` more, then the provider's turnaround.
    In a batch: the result is not back and the deadline is within `escalate_before_deadline_seconds`.
    """
    limits = config.batch
    return list(session.scalars(text(
        "SELECT id FROM tasks WHERE deadline IS NOT NULL AND ("
        " (status = 'waiting_batch' AND deadline < now() + make_interval(secs => :turnaround) "
        "   + greatest(make_interval(secs => :max_wait) - (now() - created_at), interval '0'))"
        " OR (status = 'in_batch' AND deadline < now() + make_interval(secs => :margin))"
        ") ORDER BY deadline LIMIT :limit"
    ), {"turnaround": limits.expected_turnaround_seconds, "max_wait": limits.max_wait_seconds,
        "margin": limits.escalate_before_deadline_seconds, "limit": limit}))
