"""Domain states, mirrored one to one by Postgres enums (see tierbatch.db.models).

Task status (its transitions: tierbatch.tasks.transitions, the only writer of `tasks.status`):

- ``queued``: accepted and stored, not yet routed (or put back after a retryable error).
- ``waiting_batch``: Light and not urgent; waits to be placed in a provider batch.
- ``in_batch``: its line is in a submitted provider batch.
- ``running``: an immediate provider call is in flight under a lease.
- ``succeeded`` / ``failed`` / ``cancelled``: terminal; ``finished_at`` is set exactly for these.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


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


# Sets of states are tuples so that SQL renderings of them keep one stable order.
TERMINAL_TASK_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
LIVE_TASK_STATUSES = (TaskStatus.QUEUED, TaskStatus.WAITING_BATCH, TaskStatus.IN_BATCH, TaskStatus.RUNNING)
CANCELLABLE_TASK_STATUSES = (TaskStatus.QUEUED, TaskStatus.WAITING_BATCH)
# the reconciler looks only at these: neither waits for a provider batch
IMMEDIATE_LIVE_TASK_STATUSES = (TaskStatus.QUEUED, TaskStatus.RUNNING)
BATCH_PATH_TASK_STATUSES = (TaskStatus.WAITING_BATCH, TaskStatus.IN_BATCH)


def sql_in(states: Iterable[enum.StrEnum]) -> str:
    """The SQL list of `states` for `IN` in query text, CHECKs and index predicates: `('a', 'b')`.

    Values are plain identifiers-like words (the enums above), so no quoting beyond the quotes is needed."""
    values = [str(state.value) for state in states]
    if not values or any("'" in value for value in values):
        raise ValueError(f"cannot render {values!r} as an SQL list")
    return "(" + ", ".join(f"'{value}'" for value in values) + ")"


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


TERMINAL_BATCH_STATUSES = (BatchStatus.DONE, BatchStatus.FAILED)


class ClientBatchStatus(enum.StrEnum):
    """A batch of the OpenAI-compatible `/v1/batches` facade, with OpenAI's own status names:
    validating → in_progress → finalizing → completed | expired; cancelling → cancelled; failed when the
    input is refused."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# frozen: the output and error files are assembled (tierbatch/openai_batches/results.py)
FINAL_CLIENT_BATCH_STATUSES = (ClientBatchStatus.COMPLETED, ClientBatchStatus.FAILED, ClientBatchStatus.EXPIRED,
                               ClientBatchStatus.CANCELLED)
# the expiry tick looks only at these
OPEN_CLIENT_BATCH_STATUSES = (ClientBatchStatus.IN_PROGRESS, ClientBatchStatus.FINALIZING)


class ScheduleRunStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_SCHEDULE_RUN_STATUSES = (ScheduleRunStatus.SUCCEEDED, ScheduleRunStatus.FAILED)


class ScheduleRunPhase(enum.StrEnum):
    """pending: the source is not read yet → classifying: its job runs → retrying: invalid answers are
    asked again (labelled schedules only) → done."""

    PENDING = "pending"
    CLASSIFYING = "classifying"
    RETRYING = "retrying"
    DONE = "done"


class WebhookStatus(enum.StrEnum):
    """The outbox state of a schedule run's or a job's webhook: pending until delivered, or failed
    once its attempts are used up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class ClassificationStatus(enum.StrEnum):
    """One item of a schedule run: pending while its task runs, then succeeded or failed."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
