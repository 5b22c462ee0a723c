"""Every Prometheus series tierbatch exports, each defined once (the scrape-time gauges: `live.py`).

Recorded where the work happens (API, worker children, beat) and, under `PROMETHEUS_MULTIPROC_DIR`,
summed over processes at the scrape. Label values are bounded: tenant = tenant id; provider and model =
the configured (requested) model, never the one a provider answers with; task type = a name the config
knows, else `other`; status, tier and mode = enum values (`none` for a task without a mode yet).

| series | type | labels | what it answers |
|---|---|---|---|
| `tierbatch_tasks_finished_total` | counter | status, tier, mode | tasks reaching succeeded / failed / cancelled (counted after commit) |
| `tierbatch_tasks_live` | gauge (scrape) | status, tier, mode | tasks not yet finished |
| `tierbatch_batch_waiting_tasks` | gauge (scrape) | provider, model | tasks waiting for a provider batch |
| `tierbatch_batch_oldest_wait_seconds` | gauge (scrape) | provider, model | age of the oldest of them |
| `tierbatch_provider_batches_live` | gauge (scrape) | status | provider batches not done or failed |
| `tierbatch_provider_batch_oldest_age_seconds` | gauge (scrape) | status | age of the oldest of them |
| `tierbatch_provider_batches_submitted_total` | counter | provider, model | batches the provider accepted |
| `tierbatch_provider_batches_finished_total` | counter | provider, model, status | batches ended done / failed |
| `tierbatch_provider_batch_turnaround_seconds` | histogram | provider, model | submitted → finished, per done batch |
| `tierbatch_batch_lines_ingested_total` | counter | provider, model, outcome | output lines: written (answered, billed), returned (another batch, or given up), failed |
| `tierbatch_provider_call_seconds` | histogram | provider, model, surface | one chat call to a provider (worker or gateway) |
| `tierbatch_provider_call_errors_total` | counter | provider, model, surface, status_class | failed calls: 4xx, 429, 5xx, timeout, connection |
| `tierbatch_gateway_request_seconds` | histogram | status_class | `POST /v1/chat/completions`, first byte in to last byte out |
| `tierbatch_model_cooling` | gauge (scrape) | provider, model | 1 while the model's circuit is open (cooldown) |
| `tierbatch_cooldown_trips_total` | counter | provider, model | circuits opened |
| `tierbatch_response_cache_lookups_total` | counter | result | response-cache lookups: hit, miss |
| `tierbatch_shadow_comparisons_total` | counter | task_type, verdict | quality monitor: agreed, disagreed, error |
| `tierbatch_spend_usd_total` | counter | tenant, mode | cost of priced ledger rows (committed) |
| `tierbatch_baseline_usd_total` | counter | tenant, mode | the same rows on the premium model, immediately |
| `tierbatch_unpriced_responses_total` | counter | tenant, mode | ledger rows without a price (not in spend) |
| `tierbatch_reconciler_actions_total` | counter | action | leases released, tasks re-dispatched, batch steps resumed, cache entries purged |
| `tierbatch_webhook_deliveries_total` | counter | kind, outcome | webhook attempts: delivered, retrying, gave_up |
| `tierbatch_retention_bodies_removed_total` | counter | kind | retention: task bodies (`task`) and cached answers (`cache_entry`) removed |
| `tierbatch_partitions_total` | counter | table, action | monthly partitions of `tasks` and `ledger_entries` created ahead, and of `tasks` dropped by retention |
| `tierbatch_beat_ticks_total` | counter | entry | periodic ticks beat sent (a flat line: beat is down) |
| `tierbatch_metrics_database_up` | gauge (scrape) | | 1 when the scrape's database queries answered in time |

Savings are `tierbatch_baseline_usd_total - tierbatch_spend_usd_total` (both over priced rows only).
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum

from prometheus_client import Counter, Histogram

from tierbatch.base.config import AppConfig

OTHER = "other"  # the task type of a name the config does not know
NO_MODE = "none"  # a task that was never routed (cancelled while queued)

# --- tasks ---------------------------------------------------------------------------------------------

TASKS_FINISHED = Counter("tierbatch_tasks_finished", "Tasks that reached a terminal status.",
                         ["status", "tier", "mode"])

# --- the batch path ------------------------------------------------------------------------------------

BATCHES_SUBMITTED = Counter("tierbatch_provider_batches_submitted", "Provider batches the provider accepted.",
                            ["provider", "model"])
BATCHES_FINISHED = Counter("tierbatch_provider_batches_finished", "Provider batches that ended (done or failed).",
                           ["provider", "model", "status"])
BATCH_TURNAROUND = Histogram(
    "tierbatch_provider_batch_turnaround_seconds", "From submission to the end of ingestion, per done batch.",
    ["provider", "model"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 6 * 3600, 12 * 3600, 24 * 3600))
LINES_INGESTED = Counter("tierbatch_batch_lines_ingested", "Batch output lines written, by what they did to the task.",
                         ["provider", "model", "outcome"])

# --- provider calls and the gateway -------------------------------------------------------------------

_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
PROVIDER_CALL_SECONDS = Histogram("tierbatch_provider_call_seconds", "One chat completion call to a provider.",
                                  ["provider", "model", "surface"], buckets=_CALL_BUCKETS)
PROVIDER_CALL_ERRORS = Counter("tierbatch_provider_call_errors", "Chat completion calls that failed.",
                               ["provider", "model", "surface", "status_class"])
GATEWAY_REQUEST_SECONDS = Histogram(
    "tierbatch_gateway_request_seconds", "POST /v1/chat/completions in the API, request to the response's end.",
    ["status_class"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
COOLDOWN_TRIPS = Counter("tierbatch_cooldown_trips", "Circuits opened: the model cools down.", ["provider", "model"])

# --- cache, quality, money -----------------------------------------------------------------------------

CACHE_LOOKUPS = Counter("tierbatch_response_cache_lookups", "Response cache lookups.", ["result"])
SHADOW_COMPARISONS = Counter("tierbatch_shadow_comparisons", "Quality monitor comparisons of a task with its shadow.",
                             ["task_type", "verdict"])
SPEND_USD = Counter("tierbatch_spend_usd", "Cost of committed, priced ledger rows (USD).", ["tenant", "mode"])
BASELINE_USD = Counter("tierbatch_baseline_usd", "The same rows on the premium model, immediately (USD).",
                       ["tenant", "mode"])
UNPRICED_RESPONSES = Counter("tierbatch_unpriced_responses", "Committed ledger rows without a price.",
                             ["tenant", "mode"])

# --- background work -----------------------------------------------------------------------------------

RECONCILER_ACTIONS = Counter("tierbatch_reconciler_actions", "What the reconciler found and did again.", ["action"])
WEBHOOK_DELIVERIES = Counter("tierbatch_webhook_deliveries", "Outbound webhook attempts by outcome.",
                             ["kind", "outcome"])
RETENTION_BODIES_REMOVED = Counter("tierbatch_retention_bodies_removed",
                                   "Retention: task bodies and cached answers removed.", ["kind"])
PARTITIONS = Counter("tierbatch_partitions", "Monthly partitions created ahead, or dropped by retention.",
                     ["table", "action"])
BEAT_TICKS = Counter("tierbatch_beat_ticks", "Periodic ticks sent by beat, per schedule entry.", ["entry"])


class Surface(StrEnum):
    WORKER = "worker"  # the immediate path, the background lane, shadows
    GATEWAY = "gateway"  # the API's OpenAI-compatible calls


class ReconcilerAction(StrEnum):
    LEASES_RELEASED = "leases_released"
    TASKS_REDISPATCHED = "tasks_redispatched"
    SUBMISSIONS_RESUMED = "batch_submissions_resumed"
    INGESTIONS_RESUMED = "batch_ingestions_resumed"
    CACHE_ENTRIES_PURGED = "cache_entries_purged"


class PartitionAction(StrEnum):
    CREATED = "created"
    DROPPED = "dropped"


class RemovedKind(StrEnum):
    """What the retention tick removed bodies from."""

    TASK = "task"
    CACHE_ENTRY = "cache_entry"


def mode_label(mode: object) -> str:
    if mode is None:
        return NO_MODE
    return str(mode.value if isinstance(mode, StrEnum) else mode)


def status_class(status_code: int | None, *, timed_out: bool = False) -> str:
    """A provider error or an HTTP answer as a few classes: 2xx, 4xx, 429, 5xx, timeout, connection."""
    if timed_out:
        return "timeout"
    if status_code is None:
        return "connection"
    if status_code == 429:
        return "429"
    return f"{status_code // 100}xx" if 100 <= status_code < 600 else "other"


def known_task_types(config: AppConfig) -> frozenset[str]:
    """The task types an operator named in the config: the only ones used as label values."""
    return frozenset(config.routing) | frozenset(config.cache.task_types)


def task_type_label(known: Collection[str], task_type: str) -> str:
    return task_type if task_type in known else OTHER
