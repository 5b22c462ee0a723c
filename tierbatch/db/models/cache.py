"""The response cache: a tenant's cached answers, and claims on answers being computed."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, LargeBinary, Text, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import CacheEntryStatus
from tierbatch.db.models.base import CACHE_ENTRY_STATUS, Base, now_column


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
    created_at: Mapped[datetime] = now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

