"""Domain states, mirrored one to one by Postgres enums (see core.models).

Task status (transitions in docs/architecture.md, States):

- ``queued``: accepted and stored, not yet routed (or put back after a retryable error).
- ``waiting_batch``: Light and not urgent; waits to be placed in a provider batch.
- ``in_batch``: its line is in a submitted provider batch.
- ``running``: an immediate provider call is in flight under a lease.
- ``succeeded`` / ``failed`` / ``cancelled``: terminal; ``finished_at`` is set exactly for these.
"""

from __future__ import annotations

import enum


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    WAITING_BATCH = "waiting_batch"
    IN_BATCH = "in_batch"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_TASK_STATUSES


TERMINAL_TASK_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
CANCELLABLE_TASK_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.WAITING_BATCH})


class Tier(enum.StrEnum):
    LIGHT = "light"
    COMPLEX = "complex"


class RequestedTier(enum.StrEnum):
    LIGHT = "light"
    COMPLEX = "complex"
    AUTO = "auto"


class Mode(enum.StrEnum):
    """How a task was (or a ledger row's response was) served."""

    IMMEDIATE = "immediate"
    BATCH = "batch"
    SHADOW = "shadow"
    CACHE = "cache"


class CacheEntryStatus(enum.StrEnum):
    """A response cache entry: `pending` while one caller computes the answer for everyone
    asking the same thing (until `expires_at`, its claim deadline); `ready` once the answer is stored
    (until `expires_at`, the end of its TTL)."""

    PENDING = "pending"
    READY = "ready"


class BatchStatus(enum.StrEnum):
    """Our own view of a provider batch; the provider's raw status is kept beside it."""

    PREPARING = "preparing"
    SUBMITTED = "submitted"
    INGESTING = "ingesting"
    DONE = "done"
    FAILED = "failed"


class ProviderBatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
