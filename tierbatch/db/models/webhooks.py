"""Webhook deliveries: every attempt to deliver a schedule run's or a job's webhook."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.db.models.base import Base, now_column


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
    created_at: Mapped[datetime] = now_column()

