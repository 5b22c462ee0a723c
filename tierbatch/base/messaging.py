"""Celery task names, queues and broker settings shared by the API (producer) and the worker.

The API sends tasks by name and never imports `worker`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Celery

from tierbatch.base.broker import install_repaired_transport
from tierbatch.base.settings import Settings

SUBMIT_TASKS = "tierbatch.submit_tasks"
DISPATCH_TASKS = "tierbatch.dispatch_tasks"
CALL_IMMEDIATE = "tierbatch.call_immediate"
RECONCILE = "tierbatch.reconcile"
ASSEMBLE_BATCHES = "tierbatch.batch.assemble"
SUBMIT_BATCH = "tierbatch.batch.submit"
POLL_BATCHES = "tierbatch.batch.poll"
INGEST_BATCH = "tierbatch.batch.ingest"
# scheduled classification
SCHEDULE_TICK = "tierbatch.schedules.tick"
SCHEDULE_RUN = "tierbatch.schedules.run"
SCHEDULE_FINISH = "tierbatch.schedules.finish"
SCHEDULE_WEBHOOK = "tierbatch.schedules.webhook"
# quality-aware routing
QUALITY_SHADOW = "tierbatch.quality.shadow"
# the ids of gateway calls the API recorded, about a second's worth per message, for the quality monitor
SAMPLE_GATEWAY_CALLS = "tierbatch.quality.sample_gateway_calls"
# Batch API facade: the beat step that expires client batches past their completion window
EXPIRE_CLIENT_BATCHES = "tierbatch.facade.expire"
# job webhooks: the beat check of finished jobs, and one signed POST attempt
JOB_WEBHOOK_TICK = "tierbatch.jobs.webhook_tick"
JOB_WEBHOOK = "tierbatch.jobs.webhook"
# the background lane (tierbatch.tasks.lane): the pump that claims its work, and one of its calls
LANE_PUMP = "tierbatch.lane.pump"
CALL_LANE = "tierbatch.lane.call"
# retention: the beat tick that removes the bodies of tasks finished more than `bodies_days` ago
RETENTION_TICK = "tierbatch.retention.tick"
# the monthly partitions of tasks and the ledger: made ahead, and old months of tasks dropped (`tasks_days`)
PARTITIONS_TICK = "tierbatch.retention.partitions"

QUEUE_DISPATCH = "dispatch"
QUEUE_IMMEDIATE = "immediate"
QUEUE_BATCH = "batch"
# outbound webhook POSTs: a slow receiver waits here, never in front of the tenants' dispatch work
QUEUE_WEBHOOKS = "webhooks"
# the background lane's calls: bounded in number, never in front of the urgent calls on `immediate`
QUEUE_BACKGROUND = "background"
ALL_QUEUES = (QUEUE_DISPATCH, QUEUE_IMMEDIATE, QUEUE_BATCH, QUEUE_WEBHOOKS, QUEUE_BACKGROUND)

TASK_ROUTES = {
    SUBMIT_TASKS: {"queue": QUEUE_DISPATCH},
    DISPATCH_TASKS: {"queue": QUEUE_DISPATCH},
    RECONCILE: {"queue": QUEUE_DISPATCH},
    CALL_IMMEDIATE: {"queue": QUEUE_IMMEDIATE},
    ASSEMBLE_BATCHES: {"queue": QUEUE_BATCH},
    SUBMIT_BATCH: {"queue": QUEUE_BATCH},
    POLL_BATCHES: {"queue": QUEUE_BATCH},
    INGEST_BATCH: {"queue": QUEUE_BATCH},
    # scheduled classification: bulk work on the batch queue, webhook POSTs on their own
    SCHEDULE_TICK: {"queue": QUEUE_DISPATCH},
    SCHEDULE_RUN: {"queue": QUEUE_BATCH},
    SCHEDULE_FINISH: {"queue": QUEUE_BATCH},
    SCHEDULE_WEBHOOK: {"queue": QUEUE_WEBHOOKS},
    QUALITY_SHADOW: {"queue": QUEUE_IMMEDIATE},  # quality-aware routing
    SAMPLE_GATEWAY_CALLS: {"queue": QUEUE_DISPATCH},  # two queries, then shadow messages: quick
    EXPIRE_CLIENT_BATCHES: {"queue": QUEUE_BATCH},  # assembles output files: bulk work
    JOB_WEBHOOK_TICK: {"queue": QUEUE_DISPATCH},  # job webhooks: the check is quick, the POSTs wait apart
    JOB_WEBHOOK: {"queue": QUEUE_WEBHOOKS},
    LANE_PUMP: {"queue": QUEUE_DISPATCH},  # one short transaction
    CALL_LANE: {"queue": QUEUE_BACKGROUND},
    RETENTION_TICK: {"queue": QUEUE_BATCH},  # bulk statements, bounded by a time budget
    PARTITIONS_TICK: {"queue": QUEUE_BATCH},  # DDL under a lock timeout, then bounded cleaning
}

# Chunk size for dispatch messages on bulk paths: never one message per task.
DISPATCH_CHUNK = 1000


def celery_settings(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "task_acks_late": True,  # a message is acknowledged after its task ran, not before
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 4,
        "task_routes": TASK_ROUTES,
        "task_default_queue": QUEUE_DISPATCH,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "broker_transport_options": {"visibility_timeout": 3600,
                                     **({"global_keyprefix": settings.redis_key_prefix}
                                        if settings.redis_key_prefix else {})},
        "broker_connection_retry_on_startup": True,
        # No remote control (inspect, revoke, ping: nothing here uses them): its mailbox is one more pub/sub
        # connection per worker, and when Redis dies it can report the loss before the consumer's pending BRPOP
        # does, the case in which Celery closes the consumer's channel twice (tierbatch/base/broker.py). The
        # transport itself is kombu's for redis:// and rediss://, repaired (`install_repaired_transport`).
        "worker_enable_remote_control": False,
        "enable_utc": True,
    }


log = logging.getLogger(__name__)

# what sending a message raises while the broker is unreachable
BROKER_DOWN: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@contextlib.contextmanager
def dispatch_after_commit(what: str) -> Iterator[None]:
    """Send dispatch messages for rows already committed: an unreachable broker loses nothing (the
    reconciler re-sends stale queued tasks), so the request still succeeds; answering an error here
    would make the client submit the same work twice."""
    try:
        yield
    except BROKER_DOWN as exc:
        log.warning("broker unreachable while dispatching %s (%s); the reconciler will send it",
                    what, type(exc).__name__)


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends messages (the API's side)."""
    install_repaired_transport()
    app = Celery("tierbatch-producer", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return app
