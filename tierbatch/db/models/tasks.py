"""Jobs and their tasks: a task is one chat completion request, from acceptance to its answer; a job
groups the tasks of one submission.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, Text, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import (
    BATCH_PATH_TASK_STATUSES,
    IMMEDIATE_LIVE_TASK_STATUSES,
    LIVE_TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    Mode,
    RequestedTier,
    TaskStatus,
    Tier,
    WebhookStatus,
    sql_in,
)
from tierbatch.db.models.base import MODE, MONEY, REQUESTED_TIER, TASK_STATUS, TIER, WEBHOOK_STATUS, Base, now_column


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # job webhooks (tierbatch/jobs/webhooks.py): claimed once (finished_notified_at), then delivered or failed
        CheckConstraint("(webhook_status IS NULL) = (finished_notified_at IS NULL)",
                        name="webhook_status_iff_notified"),
        # the beat check looks only at jobs with a webhook not yet notified, and at pending deliveries
        Index("ix_jobs_webhook_unnotified", "created_at",
              postgresql_where=text("webhook_url IS NOT NULL AND finished_notified_at IS NULL")),
        Index("ix_jobs_webhook_pending", "webhook_nudged_at",
              postgresql_where=text(f"webhook_status = '{WebhookStatus.PENDING}'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False, index=True)
    name: Mapped[str | None] = mapped_column(Text)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    requested_tier: Mapped[RequestedTier] = mapped_column(REQUESTED_TIER, nullable=False)
    urgent: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    webhook_url: Mapped[str | None] = mapped_column(Text)  # job webhooks: where `job.finished` is POSTed
    finished_notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # set once: the claim
    webhook_status: Mapped[WebhookStatus | None] = mapped_column(WEBHOOK_STATUS)
    webhook_body: Mapped[str | None] = mapped_column(Text)  # the exact bytes signed and sent
    webhook_nudged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last (re)send
    created_at: Mapped[datetime] = now_column()


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(f"(status IN {sql_in(TERMINAL_TASK_STATUSES)}) = (finished_at IS NOT NULL)",
                        name="finished_at_iff_terminal"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        Index("ix_tasks_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_tasks_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        # a batch's lines; with the tenant, "does this batch hold one of the tenant's tasks" is one probe
        # and a tenant's line counts per batch read the index alone (tierbatch/batching/read.py)
        Index("ix_tasks_batch", "batch_id", "tenant_id", postgresql_where=text("batch_id IS NOT NULL")),
        # The reconciler and the batch assembler only look at live tasks: keep those indexes small.
        Index("ix_tasks_live", "status", "dispatched_at",
              postgresql_where=text(f"status IN {sql_in(IMMEDIATE_LIVE_TASK_STATUSES)}")),
        Index("ix_tasks_waiting_batch", "provider", "model", "created_at",
              postgresql_where=text(f"status = '{TaskStatus.WAITING_BATCH}'")),
        # deadline escalation looks only at batch-path tasks that have a deadline
        Index("ix_tasks_batch_deadline", "deadline",
              postgresql_where=text(f"deadline IS NOT NULL AND status IN {sql_in(BATCH_PATH_TASK_STATUSES)}")),
        # budgets: a tenant's not-yet-finished tasks, counted for the pending-spend estimate
        Index("ix_tasks_tenant_live", "tenant_id",
              postgresql_where=text(f"status IN {sql_in(LIVE_TASK_STATUSES)}")),
        # quality monitor: a task's shadow (at most one: its id is derived from the task's, see
        # tierbatch.base.ids.shadow_task_id), never part of a job
        Index("ix_tasks_shadow_of", "shadow_of", postgresql_where=text("shadow_of IS NOT NULL")),
        CheckConstraint("shadow_of IS NULL OR job_id IS NULL", name="shadow_task_has_no_job"),
        # retention (tierbatch/tasks/retention.py): finished tasks whose bodies are still kept, oldest first.
        # A task gets its entry when it finishes (that update is never HOT: `status` is indexed) and loses
        # it when its bodies are removed, so the purge never reads the rows it already emptied.
        Index("ix_tasks_bodies_kept", "finished_at",
              postgresql_where=text("finished_at IS NOT NULL AND bodies_removed_at IS NULL")),
        CheckConstraint("bodies_removed_at IS NULL OR finished_at IS NOT NULL", name="bodies_removed_only_finished"),
        # monthly partitions on the id (tierbatch/db/partitions.py): a unique index must include it, so the
        # uniqueness of idempotency keys and of a job's item ids lives in `task_idempotency_keys` and `job_item_ids`
        {"postgresql_partition_by": "RANGE (id)"},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    item_id: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    requested_tier: Mapped[RequestedTier] = mapped_column(REQUESTED_TIER, nullable=False)
    tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    tier_reason: Mapped[str] = mapped_column(Text, nullable=False)
    urgent: Mapped[bool] = mapped_column(Boolean, nullable=False)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    request: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    task_metadata: Mapped[dict[str, str]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    status: Mapped[TaskStatus] = mapped_column(TASK_STATUS, nullable=False)
    mode: Mapped[Mode | None] = mapped_column(MODE)
    provider: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    served_model: Mapped[str | None] = mapped_column(Text)
    # set only to a batch row inserted in the same transaction (the claim, the split of a refused batch);
    # no foreign key: its per-row check (a probe and a lock of that one batch row, once per task) was
    # nearly half of a 50,000-task claim
    batch_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    output: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    baseline_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = now_column()
    updated_at: Mapped[datetime] = now_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A shadow task: the quality monitor's second request of task `shadow_of` on the other tier,
    # sent through the batch path when that task was not urgent. Its ledger row is a `shadow` row of
    # `shadow_of`; it is not listed to the tenant and belongs to no job. No foreign key (none refers to
    # `tasks`: dropping a month's partition would check every referring row under an exclusive lock on
    # `tasks`): the shadow is written from its task's row and lives in its task's partition.
    shadow_of: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # retention: when the prompt (`request` became `{}`), `output` and `response` were removed; NULL: kept
    bodies_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))



class TaskIdempotencyKey(Base):
    """A tenant's idempotency key and the task it names: the key's uniqueness, which `tasks` (partitioned on
    its id) cannot hold. Written with the task, in its transaction (tierbatch/tasks/store.py); removed
    when the task's partition is dropped (tierbatch/tasks/partitions.py). No foreign keys: the row is
    written from the task row of the same transaction."""

    __tablename__ = "task_idempotency_keys"
    __table_args__ = (Index("ix_task_idempotency_keys_task", "task_id"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(Text, primary_key=True)
    task_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)


class JobItemId(Base):
    """An item id taken in a job, also across appends: the uniqueness `tasks` (partitioned on its id)
    cannot hold. COPied with the job's tasks (tierbatch/jobs/store.py); an item id is given back when its
    task's partition is dropped. No foreign key: a per-row check on the bulk path, for a job row the same
    transaction has just read or written."""

    __tablename__ = "job_item_ids"

    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    item_id: Mapped[str] = mapped_column(Text, primary_key=True)
