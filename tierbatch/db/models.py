"""SQLAlchemy models: the single source of truth for the schema (Alembic autogenerates against it)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tierbatch.base.states import (
    BATCH_PATH_TASK_STATUSES,
    IMMEDIATE_LIVE_TASK_STATUSES,
    LIVE_TASK_STATUSES,
    OPEN_CLIENT_BATCH_STATUSES,
    TERMINAL_BATCH_STATUSES,
    TERMINAL_SCHEDULE_RUN_STATUSES,
    TERMINAL_TASK_STATUSES,
    BatchStatus,
    CacheEntryStatus,
    ClassificationStatus,
    ClientBatchStatus,
    Mode,
    ProviderBatchStatus,
    RequestedTier,
    ScheduleRunPhase,
    ScheduleRunStatus,
    TaskStatus,
    Tier,
    WebhookStatus,
    sql_in,
)

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
CACHE_ENTRY_STATUS = _pg_enum(CacheEntryStatus, "cache_entry_status")
CLIENT_BATCH_STATUS = _pg_enum(ClientBatchStatus, "client_batch_status")
SCHEDULE_RUN_STATUS = _pg_enum(ScheduleRunStatus, "schedule_run_status")
SCHEDULE_RUN_PHASE = _pg_enum(ScheduleRunPhase, "schedule_run_phase")
WEBHOOK_STATUS = _pg_enum(WebhookStatus, "webhook_status")  # shared by jobs and schedule runs
CLASSIFICATION_STATUS = _pg_enum(ClassificationStatus, "classification_status")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("requests_per_minute > 0", name="requests_per_minute_positive"),
        CheckConstraint("tokens_per_minute > 0", name="tokens_per_minute_positive"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    # per-tenant rate limits across all API processes (NULL: no limit); see tierbatch/tenants/auth.py
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    # job webhooks: the key that signs the tenant's `job.finished` POSTs, encrypted with TIERBATCH_SECRET_KEY
    # (tierbatch/base/secretbox.py), shown once at creation and at rotation; NULL: none yet (rotate to set one)
    webhook_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()


class ApiKey(Base):
    """A tenant's API key: only its SHA-256 digest is kept (keys are long and random, so the digest is a
    safe store). A revoked key keeps its row (who held what, and when) and is refused from then on."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("revoked_at IS NULL OR revoked_at >= created_at", name="revoked_after_created"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(Text, nullable=False)  # the first characters, to tell keys apart
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


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
    created_at: Mapped[datetime] = _now_column()


class ProviderBatch(Base):
    __tablename__ = "provider_batches"
    __table_args__ = (
        CheckConstraint(
            f"(status IN {sql_in(TERMINAL_BATCH_STATUSES)}) = (finished_at IS NOT NULL)",
            name="finished_at_iff_terminal",
        ),
        Index("ix_provider_batches_open", "status",
              postgresql_where=text(f"status NOT IN {sql_in(TERMINAL_BATCH_STATUSES)}")),
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
        CheckConstraint(f"(status IN {sql_in(TERMINAL_TASK_STATUSES)}) = (finished_at IS NOT NULL)",
                        name="finished_at_iff_terminal"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # partial: most tasks have no key, and a full index took an entry (a write) for each of them
        Index("uq_tasks_tenant_idempotency_key", "tenant_id", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL")),
        Index("ix_tasks_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_tasks_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
        # jobs: an item id names one task within its job, also across appends (tierbatch/jobs/store.py)
        Index("uq_tasks_job_item", "job_id", "item_id", unique=True, postgresql_where=text("job_id IS NOT NULL")),
        Index("ix_tasks_batch", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
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
        # quality monitor: at most one batch-path shadow task per task, never part of a job
        Index("uq_tasks_shadow_of", "shadow_of", unique=True, postgresql_where=text("shadow_of IS NOT NULL")),
        CheckConstraint("shadow_of IS NULL OR job_id IS NULL", name="shadow_task_has_no_job"),
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
    # A shadow task: the quality monitor's second request of task `shadow_of` on the other tier,
    # sent through the batch path when that task was not urgent. Its ledger row is a `shadow` row of
    # `shadow_of`; it is not listed to the tenant and belongs to no job.
    shadow_of: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tasks.id"))


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
            "input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0 AND reasoning_tokens >= 0 "
            "AND cached_tokens <= input_tokens",
            name="token_counts_valid",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # Only the task is a foreign key: tenant, job and batch are copied from the task row in the statement
    # that writes the ledger row, and a per-row check of each cost a third of batch ingestion (0005).
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id"), nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
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
    # OpenAI front door: true when the token counts are our estimate (a stream the client left
    # before the provider reported usage), not the provider's
    usage_estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                                  server_default=text("false"))
    created_at: Mapped[datetime] = _now_column()


# --- cost rollup -------------------------------------------------------------------------------------
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
    input_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cached_input_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    output_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    reasoning_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    shadow_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    baseline_cost_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    savings_usd: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
# --- end cost rollup ---------------------------------------------------------------------------------


# --- OpenAI-compatible Batch API facade --------------------------------------------------------------


class StoredFile(Base):
    """A file of the `/v1/files` facade: batch input files uploaded by a tenant, the output and error
    files assembled for its batches, and data files (`user_data`) a schedule's source reads. The
    content lives in `file_parts`, in order."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("purpose IN ('batch', 'batch_output', 'user_data')", name="purpose_known"),
        Index("ix_files_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # "file-" + 24 hex digits
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    purpose: Mapped[str] = mapped_column(Text, nullable=False)
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    line_count: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = _now_column()


class FilePart(Base):
    """One chunk (up to 1 MiB) of a stored file's content; `part` orders them from 0."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class ClientBatch(Base):
    """A batch of the `/v1/batches` facade. Its lines are the tasks of `job_id` (item id = custom_id);
    its status and counts follow those tasks, and are frozen here once its files are assembled."""

    __tablename__ = "client_batches"
    __table_args__ = (
        Index("ix_client_batches_tenant_created", "tenant_id", "created_at", "id"),
        # the expiry tick (openai_batches `due_batches`) looks only at open batches past their window
        Index("ix_client_batches_due", "expires_at",
              postgresql_where=text(f"status IN {sql_in(OPEN_CLIENT_BATCH_STATUSES)}")),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # "batch_" + 24 hex digits
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), nullable=False, unique=True)
    input_file_id: Mapped[str] = mapped_column(Text, nullable=False)  # no FK: the file may be deleted
    endpoint: Mapped[str] = mapped_column(Text, nullable=False)
    completion_window: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[ClientBatchStatus] = mapped_column(CLIENT_BATCH_STATUS, nullable=False)
    batch_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONB)
    output_file_id: Mapped[str | None] = mapped_column(Text)
    error_file_id: Mapped[str | None] = mapped_column(Text)
    request_total: Mapped[int] = mapped_column(Integer, nullable=False)
    # frozen at finalization; live counts come from the tasks before that
    request_completed: Mapped[int | None] = mapped_column(Integer)
    request_failed: Mapped[int | None] = mapped_column(Integer)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
# --- end OpenAI-compatible Batch API facade ----------------------------------------------------------


# --- scheduled classification ------------------------------------------------------------------------


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
    job: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)  # the job template (schedules.service)
    source: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    sink: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # the key that signs the run webhooks, encrypted (tierbatch/base/secretbox.py), shown once; NULL: none stored
    webhook_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    cursor: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # SQL source: {"type", "value"} of the last row
    next_fire_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_fire_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()


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
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
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
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tasks.id"))
    status: Mapped[ClassificationStatus] = mapped_column(CLASSIFICATION_STATUS, nullable=False)
    label: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)  # the raw answer (kept when it is not a valid label)
    model: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    classified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One attempt to deliver a webhook: a schedule run's or a job's (exactly one of the two)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("run_id", "attempt", name="uq_webhook_deliveries_run_attempt"),
        UniqueConstraint("job_id", "attempt", name="uq_webhook_deliveries_job_attempt"),
        CheckConstraint("(run_id IS NULL) <> (job_id IS NULL)", name="one_subject"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("schedule_runs.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now_column()
# --- end scheduled classification --------------------------------------------------------------------


# --- quality-aware routing ----------------------------------------------------------------------------
class RoutingRule(Base):
    """The tier for a tenant's task type; overrides config `[routing]` (seeded from it lazily)."""

    __tablename__ = "routing_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "task_type", name="uq_routing_rules_tenant_task_type"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    pinned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)  # config | api | quality
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()


class RoutingEvent(Base):
    """One change of a routing rule: who or what, when, why, and the figures behind it."""

    __tablename__ = "routing_events"
    __table_args__ = (Index("ix_routing_events_tenant_task_type", "tenant_id", "task_type", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str] = mapped_column(Text, nullable=False)  # quality | api | config
    action: Mapped[str] = mapped_column(Text, nullable=False)  # promote | demote | set | seed
    from_tier: Mapped[Tier | None] = mapped_column(TIER)
    to_tier: Mapped[Tier] = mapped_column(TIER, nullable=False)
    pinned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    figures: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now_column()


class QualityComparison(Base):
    """One shadow (or probe) comparison of the light and complex models' answers to the same task."""

    __tablename__ = "quality_comparisons"
    __table_args__ = (
        UniqueConstraint("task_id", name="uq_quality_comparisons_task_id"),
        Index("ix_quality_comparisons_window", "tenant_id", "task_type", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id"), nullable=False)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    light_model: Mapped[str] = mapped_column(Text, nullable=False)
    complex_model: Mapped[str] = mapped_column(Text, nullable=False)
    shadow_tier: Mapped[Tier] = mapped_column(TIER, nullable=False)  # the tier of the extra call
    agreed: Mapped[bool | None] = mapped_column(Boolean)  # NULL: the shadow call failed (provider error)
    score: Mapped[float | None] = mapped_column(Numeric(6, 4, asdecimal=False))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
# --- end quality-aware routing ------------------------------------------------------------------------


class ResponseCacheEntry(Base):
    """A cached answer (or a claim on computing one) for a tenant's request, keyed by a hash of the
    tier's model, the messages and the parameters (tierbatch/cache/responses.py). `expires_at` is the claim deadline
    of a pending entry and the end of the TTL of a ready one: lookups ignore expired rows, and the
    purge deletes them through the index on `expires_at` (no scan of live entries)."""

    __tablename__ = "response_cache"
    __table_args__ = (
        CheckConstraint("(status = 'pending') = (owner IS NOT NULL)", name="owner_iff_pending"),
        CheckConstraint("status = 'pending' OR (response IS NOT NULL AND served_model IS NOT NULL)",
                        name="ready_has_response"),
        Index("ix_response_cache_expires_at", "expires_at"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)  # sha256 of the canonical request
    status: Mapped[CacheEntryStatus] = mapped_column(CACHE_ENTRY_STATUS, nullable=False)
    owner: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))  # the pending claim's token
    provider: Mapped[str | None] = mapped_column(Text)
    requested_model: Mapped[str | None] = mapped_column(Text)
    served_model: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    source_task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))  # the task that paid for it
    hits: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
