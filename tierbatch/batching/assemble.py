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


def waiting_groups(session: Session, cap: int) -> list[Group]:
    """The (provider, model) groups of waiting tasks, each measured over at most its `cap` oldest tasks.

    A group is found by one probe of ix_tasks_waiting_batch per group (a loose index scan), and its
    count, age and bytes read at most `cap` rows: with `cap` = `max_requests`, `group_is_due` says what it
    would say over the whole group (a group that reaches the cap is due), and a backlog of a million
    waiting tasks costs a batch's worth of rows per tick, not a million.

    JIT is off for the rest of the caller's transaction: the planner prices the recursive scan at a
    hundred groups, which crosses `jit_above_cost`, and compiling cost 200 ms of a 250 ms run.
    """
    session.execute(text("SET LOCAL jit = off"))
    rows = session.execute(text(
        "WITH RECURSIVE grp(provider, model) AS ("
        "  (SELECT provider, model FROM tasks WHERE status = 'waiting_batch' ORDER BY provider, model LIMIT 1)"
        "  UNION ALL"
        "  SELECT nxt.provider, nxt.model FROM grp CROSS JOIN LATERAL ("
        "    SELECT provider, model FROM tasks WHERE status = 'waiting_batch'"
        "      AND (provider, model) > (grp.provider, grp.model) ORDER BY provider, model LIMIT 1) AS nxt"
        ") "
        "SELECT grp.provider, grp.model, head.waiting, head.age, head.bytes FROM grp CROSS JOIN LATERAL ("
        "  SELECT count(*) AS waiting, extract(epoch FROM now() - min(created_at)) AS age,"
        "         sum(size) AS bytes FROM ("
        "    SELECT created_at, pg_column_size(request) AS size FROM tasks"
        "    WHERE status = 'waiting_batch' AND provider = grp.provider AND model = grp.model"
        "    ORDER BY created_at LIMIT :cap) AS oldest"
        ") AS head"
    ), {"cap": cap}).all()
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
        # in the order of ix_tasks_waiting_batch alone: the tasks of one upload share its transaction's
        # created_at, and a tie-break on id made each claim sort every waiting task of the group
        "ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED"
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
