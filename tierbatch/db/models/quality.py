"""Quality-aware routing: the tier rule per tenant and task type, its changes, and the shadow comparisons
that move it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Numeric, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.base.states import Tier
from tierbatch.db.models.base import TIER, Base, now_column


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
    created_at: Mapped[datetime] = now_column()
    updated_at: Mapped[datetime] = now_column()


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
    created_at: Mapped[datetime] = now_column()


class QualityComparison(Base):
    """One shadow (or probe) comparison of the light and complex models' answers to the same task."""

    __tablename__ = "quality_comparisons"
    __table_args__ = (
        UniqueConstraint("task_id", name="uq_quality_comparisons_task_id"),
        Index("ix_quality_comparisons_window", "tenant_id", "task_type", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # the task compared; NULL once retention dropped it (the comparison stays: it counts in the quality
    # window and history). No foreign key: see Task.shadow_of.
    task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    task_type: Mapped[str] = mapped_column(Text, nullable=False)
    light_model: Mapped[str] = mapped_column(Text, nullable=False)
    complex_model: Mapped[str] = mapped_column(Text, nullable=False)
    shadow_tier: Mapped[Tier] = mapped_column(TIER, nullable=False)  # the tier of the extra call
    agreed: Mapped[bool | None] = mapped_column(Boolean)  # NULL: the shadow call failed (provider error)
    score: Mapped[float | None] = mapped_column(Numeric(6, 4, asdecimal=False))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = now_column()

