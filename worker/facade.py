"""Celery task of the Batch API facade; the logic is in tierbatch/openai_batches/expiry.py.

`tierbatch.facade.expire` (beat, at the batch poll interval): the client batches past `expires_at` and
not final, one transaction each. Every step locks the batch row (SKIP LOCKED) and is guarded by its
status, so two workers running it at once expire a batch exactly once.
"""

from __future__ import annotations

import logging

from celery import Task as CeleryTask
from celery import shared_task

from tierbatch.base.messaging import EXPIRE_CLIENT_BATCHES
from tierbatch.base.states import ClientBatchStatus
from tierbatch.openai_batches.expiry import due_batches, expire_batch
from tierbatch.worker.context import context_of

log = logging.getLogger(__name__)


@shared_task(name=EXPIRE_CLIENT_BATCHES, bind=True)
def expire_client_batches(self: CeleryTask) -> int:
    """Expire the due client batches; the number that ended `expired` in this run."""
    ctx = context_of(self.app)
    with ctx.sessions() as session:
        due = due_batches(session)
    expired = 0
    for batch_id in due:
        try:
            with ctx.sessions.begin() as session:
                status = expire_batch(session, batch_id)
        except Exception:  # one batch's failure must not hold up the others; the next tick tries again
            log.exception("client batch %s: expiry step failed", batch_id)
            continue
        if status == ClientBatchStatus.EXPIRED:
            expired += 1
            log.info("client batch %s expired", batch_id)
    return expired
