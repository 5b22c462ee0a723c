"""Batches: the provider batches that batch-path tasks are sent in, and the client batches of the
OpenAI-compatible `/v1/batches` facade (whose lines are the tasks of a job).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, Text, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import (
    OPEN_CLIENT_BATCH_STATUSES,
    TERMINAL_BATCH_STATUSES,
    BatchStatus,
    ClientBatchStatus,
    ProviderBatchStatus,
    sql_in,
)
from tierbatch.db.models.base import BATCH_STATUS, CLIENT_BATCH_STATUS, PROVIDER_BATCH_STATUS, Base, now_column


class ProviderBatch(Base):
    __tablename__ = "provider_batches"
    __table_args__ = (
        CheckConstraint(
            f"(status IN {sql_in(TERMINAL_BATCH_STATUSES)}) = (finished_at IS NOT NULL)",
            name="finished_at_iff_terminal",
        ),
        # the provider reports a batch finished only after it was submitted, and we ingest only what it
        # reported finished; a batch is done-and-ingested, never failed-and-ingested
        CheckConstraint("completed_at IS NULL OR submitted_at IS NOT NULL", name="completed_after_submitted"),
        CheckConstraint(f"ingested_at IS NULL OR (status = '{BatchStatus.DONE.value}' AND completed_at IS NOT NULL)",
                        name="ingested_only_done"),
        Index("ix_provider_batches_open", "status",
              postgresql_where=text(f"status NOT IN {sql_in(TERMINAL_BATCH_STATUSES)}")),
        # `GET /v1/provider-batches`: newest first, keyset pages
        Index("ix_provider_batches_created", "created_at", "id"),
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
    created_at: Mapped[datetime] = now_column()
    updated_at: Mapped[datetime] = now_column()
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when the provider reported the batch finished (completed, expired, failed, cancelled)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when its output was ingested (the batch is done)
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


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
    created_at: Mapped[datetime] = now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

