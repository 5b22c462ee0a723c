"""SQLAlchemy models: the single source of truth for the schema (Alembic autogenerates against it).

One module per group of tables; this package imports every one of them, so `Base.metadata` is complete
whichever model is imported (migrations/env.py and tierbatch/db/bulk_sql.py rely on that), and names them
all here: import models from `tierbatch.db.models`.
"""

from tierbatch.db.models.base import Base
from tierbatch.db.models.batches import ClientBatch, ProviderBatch
from tierbatch.db.models.cache import ResponseCacheEntry
from tierbatch.db.models.files import FilePart, StoredFile
from tierbatch.db.models.ledger import LedgerDaily, LedgerEntry
from tierbatch.db.models.quality import QualityComparison, RoutingEvent, RoutingRule
from tierbatch.db.models.schedules import Classification, Schedule, ScheduleRun
from tierbatch.db.models.tasks import Job, JobItemId, Task, TaskIdempotencyKey
from tierbatch.db.models.tenants import ApiKey, Tenant
from tierbatch.db.models.webhooks import WebhookDelivery

__all__ = [
    "ApiKey",
    "Base",
    "Classification",
    "ClientBatch",
    "FilePart",
    "Job",
    "JobItemId",
    "LedgerDaily",
    "LedgerEntry",
    "ProviderBatch",
    "QualityComparison",
    "ResponseCacheEntry",
    "RoutingEvent",
    "RoutingRule",
    "Schedule",
    "ScheduleRun",
    "StoredFile",
    "Task",
    "TaskIdempotencyKey",
    "Tenant",
    "WebhookDelivery",
]
