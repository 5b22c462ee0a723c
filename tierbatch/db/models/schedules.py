"""Scheduled classification: cron schedules, their runs, and the items each run classified."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import (
    TERMINAL_SCHEDULE_RUN_STATUSES,
    ClassificationStatus,
    ScheduleRunPhase,
    ScheduleRunStatus,
    WebhookStatus,
    sql_in,
)
from tierbatch.db.models.base import (
    CLASSIFICATION_STATUS,
    MONEY,
    SCHEDULE_RUN_PHASE,
    SCHEDULE_RUN_STATUS,
    WEBHOOK_STATUS,
    Base,
    now_column,
)


class Schedule(Base):
    """A cron schedule that classifies the items of a source (file glob or SQL query) as a bulk job."""

    __tablename__ = "schedules"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_schedules_tenant_name"),
        # the beat tick: enabled schedules by their next fire time
        Index("ix_schedules_due", "next_fire_at", postgresql_where=text("enabled")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    cron: Mapped[str] = mapped_column(Text, nullable=False)
    timezone: Mapped[str] = mapped_column(Text, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    job: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)  # the job template (schedules.spec)
    source: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    sink: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # the key that signs the run webhooks, encrypted (tierbatch/base/secretbox.py), shown once; NULL: none stored
    webhook_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    cursor: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # SQL source: {"type", "value"} of the last row
    next_fire_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_fire_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = now_column()
    updated_at: Mapped[datetime] = now_column()


class ScheduleRun(Base):
    """One firing of a schedule; (schedule, fire time) is unique, so a run is never started twice."""

    __tablename__ = "schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_time", name="uq_schedule_runs_schedule_fire_time"),
        CheckConstraint(f"(status IN {sql_in(TERMINAL_SCHEDULE_RUN_STATUSES)}) = (finished_at IS NOT NULL)",
                        name="finished_at_iff_terminal"),
        Index("ix_schedule_runs_schedule_created", "schedule_id", "created_at"),
        Index("ix_schedule_runs_open", "phase", postgresql_where=text(f"status = '{ScheduleRunStatus.RUNNING}'")),
        Index("ix_schedule_runs_webhook_pending", "id",
              postgresql_where=text(f"webhook_status = '{WebhookStatus.PENDING}'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), nullable=False)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    fire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    trigger: Mapped[str] = mapped_column(Text, nullable=False)  # cron | manual
    status: Mapped[ScheduleRunStatus] = mapped_column(SCHEDULE_RUN_STATUS, nullable=False)
    phase: Mapped[ScheduleRunPhase] = mapped_column(SCHEDULE_RUN_PHASE, nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    retry_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    task_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    skipped_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    source_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    label_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cursor_before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    cursor_after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    sink_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    webhook_status: Mapped[WebhookStatus | None] = mapped_column(WEBHOOK_STATUS)
    webhook_body: Mapped[str | None] = mapped_column(Text)  # the exact bytes signed and sent
    nudged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last (re)send of a message
    created_at: Mapped[datetime] = now_column()
    updated_at: Mapped[datetime] = now_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Classification(Base):
    """One item of a schedule run and its answer; also the per-schedule record of items already done."""

    __tablename__ = "classifications"
    __table_args__ = (
        # an item already classified for the schedule (same id, same text) is skipped; failed ones are retried
        Index("uq_classifications_schedule_item", "schedule_id", "item_id", "text_hash", unique=True,
              postgresql_where=text(f"status <> '{ClassificationStatus.FAILED}'")),
        UniqueConstraint("run_id", "item_id", name="uq_classifications_run_item"),
        Index("ix_classifications_task", "task_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), nullable=False)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedule_runs.id", ondelete="CASCADE"), nullable=False)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    item_id: Mapped[str] = mapped_column(Text, nullable=False)
    text_hash: Mapped[str] = mapped_column(Text, nullable=False)  # sha256 hex of the item's text
    # the item's task; NULL once retention dropped it (its label and cost stay here). No foreign key: see
    # Task.shadow_of.
    task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    status: Mapped[ClassificationStatus] = mapped_column(CLASSIFICATION_STATUS, nullable=False)
    label: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)  # the raw answer (kept when it is not a valid label)
    model: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = now_column()
    classified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

