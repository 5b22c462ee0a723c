"""Tenants and their API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Integer, Text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.db.models.base import MONEY, Base, now_column


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
    created_at: Mapped[datetime] = now_column()


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
    created_at: Mapped[datetime] = now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

