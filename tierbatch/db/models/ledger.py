"""The cost ledger: one row per provider response or cache hit, and its daily rollup `ledger_daily`.

The analyst views over them (`cost_ledger`, `cost_daily` and the views grouped from it) and the triggers that
keep the rollup in step are migration 0002's (with cache writes since 0012); autogenerate does not see them.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Date, Index, Integer, Numeric, Text, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import Mode, Tier
from tierbatch.db.models.base import MODE, MONEY, TIER, UNIT_PRICE, Base, now_column


class LedgerEntry(Base):
    """One row per provider response (or cache hit). Append-only."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # No double billing: one non-shadow row per task, enforced by the database.
        Index("uq_ledger_entries_task_billed", "task_id", unique=True,
              postgresql_where=text("mode <> 'shadow'")),
        Index("ix_ledger_entries_tenant_created", "tenant_id", "created_at"),
        Index("ix_ledger_entries_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        # cost queries: time ranges over all tenants; rows arrive in time order, so BRIN is tiny
        Index("ix_ledger_entries_created_brin", "created_at", postgresql_using="brin"),
        CheckConstraint("unpriced = (cost_usd IS NULL)", name="unpriced_iff_no_cost"),
        CheckConstraint(
            "input_tokens >= 0 AND cached_tokens >= 0 AND cache_write_tokens >= 0 AND output_tokens >= 0 "
            "AND reasoning_tokens >= 0 AND cached_tokens + cache_write_tokens <= input_tokens",
            name="token_counts_valid",
        ),
        # monthly partitions on the task id, the bounds of `tasks` (tierbatch/db/partitions.py): a ledger row
        # lives in its task's month, so the billed index on task_id stays one index over every partition.
        # Ledger partitions are never dropped.
        {"postgresql_partition_by": "RANGE (task_id)"},
    )

    # the primary key is (id, task_id): a unique index of a partitioned table must include its partition key
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # No foreign keys: tenant, job, batch and the task itself are copied from the task row in the statement
    # that writes the ledger row (or that row's RETURNING), and a per-row check of each cost a third of batch
    # ingestion (migration 0005), the task's a sixth of it against a million-task table (0014).
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    task_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    mode: Mapped[Mode] = mapped_column(MODE, nullable=False)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    requested_model: Mapped[str] = mapped_column(Text, nullable=False)
    served_model: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # cached (read from the prompt cache) and cache-write tokens are parts of the input tokens, each
    # billed at its own price; the rest of the input at `input_price`
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0,
                                                    server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    cached_input_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    # NULL on rows written before cache writes were recorded (0012), as is their cost
    cache_write_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    output_price: Mapped[Decimal | None] = mapped_column(UNIT_PRICE)
    input_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cached_input_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cache_write_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    output_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    baseline_cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    unpriced: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # a batch row of a model whose price table entry has no batch price of its own: the provider's
    # `batch_discount` its prices were derived with from the standard ones; NULL otherwise
    batch_discount: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    # OpenAI front door: true when the token counts are our estimate (a stream the client left
    # before the provider reported usage), not the provider's
    usage_estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                                  server_default=text("false"))
    created_at: Mapped[datetime] = now_column()


class LedgerDaily(Base):
    """Ledger sums per UTC day and (tenant, job, task type, tier, mode, provider, served model).

    Kept in step with `ledger_entries` by statement-level triggers (migration 0002) in the same
    transaction that writes the ledger, so cost queries and month-to-date budget checks read a few
    rows per day instead of every ledger row. Money sums are over priced rows (NULL costs are skipped);
    see tierbatch/costs/query.py for what each column counts.
    """

    __tablename__ = "ledger_daily"
    __table_args__ = (
        Index("uq_ledger_daily_key", "tenant_id", "day", "task_type", "tier", "mode", "provider", "served_model",
              "job_id", unique=True, postgresql_nulls_not_distinct=True),
        Index("ix_ledger_daily_day", "day"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    day: Mapped[date] = mapped_column(Date, nullable=False)  # the UTC day of the ledger rows' created_at
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    mode: Mapped[Mode] = mapped_column(MODE, nullable=False)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    served_model: Mapped[str] = mapped_column(Text, nullable=False)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cached_input_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cache_write_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    output_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    reasoning_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    shadow_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    baseline_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    savings_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)

