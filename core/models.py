"""SQLAlchemy models: the single source of truth for the schema (Alembic autogenerates against it)."""

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
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.states import BatchStatus, Mode, ProviderBatchStatus, RequestedTier, TaskStatus, Tier

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MONEY = Numeric(20, 10)
UNIT_PRICE = Numeric(20, 10)  # USD per million tokens


def _pg_enum(enum_cls: type, name: str) -> Enum:
    return Enum(enum_cls, name=name, values_callable=lambda members: [m.value for m in members],
                validate_strings=True)


TASK_STATUS = _pg_enum(TaskStatus, "task_status")
TIER = _pg_enum(Tier, "tier")
REQUESTED_TIER = _pg_enum(RequestedTier, "requested_tier")
MODE = _pg_enum(Mode, "serve_mode")
BATCH_STATUS = _pg_enum(BatchStatus, "batch_status")
PROVIDER_BATCH_STATUS = _pg_enum(ProviderBatchStatus, "provider_batch_status")

_TERMINAL = "('succeeded', 'failed', 'cancelled')"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    api_key_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    api_key_prefix: Mapped[str] = mapped_column(Text, nullable=False)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    created_at: Mapped[datetime] = _now_column()


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False, index=True)
    name: Mapped[str | None] = mapped_column(Text)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    requested_tier: Mapped[RequestedTier] = mapped_column(REQUESTED_TIER, nullable=False)
    urgent: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now_column()


class ProviderBatch(Base):
    __tablename__ = "provider_batches"
    __table_args__ = (
        CheckConstraint(
            "(status IN ('done', 'failed')) = (finished_at IS NOT NULL)", name="finished_at_iff_terminal"
        ),
        Index("ix_provider_batches_open", "status", postgresql_where=text("status NOT IN ('done', 'failed')")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[BatchStatus] = mapped_column(BATCH_STATUS, nullable=False)
    provider_status: Mapped[ProviderBatchStatus | None] = mapped_column(PROVIDER_BATCH_STATUS)
    provider_batch_id: Mapped[str | None] = mapped_column(Text, unique=True)
    input_file_id: Mapped[str | None] = mapped_column(Text)
    output_file_id: Mapped[str | None] = mapped_column(Text)
    error_file_id: Mapped[str | None] = mapped_column(Text)
    request_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    byte_size: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(f"(status IN {_TERMINAL}) = (finished_at IS NOT NULL)", name="finished_at_iff_terminal"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_tasks_tenant_idempotency_key"),
        Index("ix_tasks_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_tasks_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        # jobs: an item id names one task within its job, also across appends (core/jobs.py)
        Index("uq_tasks_job_item", "job_id", "item_id", unique=True, postgresql_where=text("job_id IS NOT NULL")),
        Index("ix_tasks_batch", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
        # The reconciler and the batch assembler only look at live tasks: keep those indexes small.
        Index("ix_tasks_live", "status", "dispatched_at",
              postgresql_where=text("status IN ('queued', 'running')")),
        Index("ix_tasks_waiting_batch", "provider", "model", "created_at",
              postgresql_where=text("status = 'waiting_batch'")),
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
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("provider_batches.id"))
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
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LedgerEntry(Base):
    """One row per provider response (or cache hit). Append-only."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # No double billing (DESIGN §12.2): one non-shadow row per task, enforced by the database.
        Index("uq_ledger_entries_task_billed", "task_id", unique=True,
              postgresql_where=text("mode <> 'shadow'")),
        Index("ix_ledger_entries_tenant_created", "tenant_id", "created_at"),
        Index("ix_ledger_entries_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        CheckConstraint("unpriced = (cost_usd IS NULL)", name="unpriced_iff_no_cost"),
        CheckConstraint(
            "input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0 AND reasoning_tokens >= 0 "
            "AND cached_tokens <= input_tokens",
            name="token_counts_valid",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id"), nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("provider_batches.id"))
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    mode: Mapped[Mode] = mapped_column(MODE, nullable=False)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    requested_model: Mapped[str] = mapped_column(Text, nullable=False)
    served_model: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    cached_input_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    output_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    input_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cached_input_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    output_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    baseline_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    unpriced: Mapped[bool] = mapped_column(Boolean, nullable=False)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now_column()
