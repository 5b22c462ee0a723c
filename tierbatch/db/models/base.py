"""The declarative base of every model, the constraint naming convention, and the column types the tables
share: money, unit prices, the Postgres enums mirroring tierbatch.base.states, the creation timestamp.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Enum, MetaData, Numeric, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tierbatch.base.states import (
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


def now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
