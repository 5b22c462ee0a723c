"""Batch path steps run by the worker: assemble, submit, poll, ingest. Each is idempotent.

After each ingested chunk commits, the tasks it moved to `succeeded` that the quality monitor samples get
their shadow (worker/quality.py): the sample is chosen in Python by task id, the chunk's SQL returns which
of those it moved, and only those become shadow tasks. Shadow tasks in a batch are compared once the
batch's results are in.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from tierbatch.base.errors import ProviderError
from tierbatch.base.states import BatchStatus, ProviderBatchStatus
from tierbatch.batching.assemble import ClaimedBatch, claim_batch, group_is_due, tasks_to_escalate, waiting_groups
from tierbatch.batching.build import write_batch_file
from tierbatch.batching.ingest import (
    IngestedChunk,
    PreparedChunk,
    classify_lines,
    collector_paused,
    prepare_outcomes,
    return_lines_to_waiting,
    write_prepared,
)
from tierbatch.batching.lifecycle import (
    METADATA_KEY,
    batches_in,
    created_epoch,
    finish_batch,
    note_submission_attempt,
    record_poll,
    record_submitted,
    record_uploaded_file,
    split_failed_batch,
    tasks_left_in_batch,
    touch_batch,
)
from tierbatch.cache.responses import fill_from_succeeded_tasks
from tierbatch.db.models import ProviderBatch
from tierbatch.providers.client import ProviderBatches
from tierbatch.worker.context import WorkerContext
from tierbatch.worker.quality import send_batch_shadows, settle_batch_shadows

log = logging.getLogger(__name__)


def assemble_batches(ctx: WorkerContext, on_claimed: Callable[[ClaimedBatch], None] = lambda _batch: None
                     ) -> tuple[list[uuid.UUID], list[ClaimedBatch]]:
    """Returns the tasks to escalate to immediate calls and the batches claimed for submission.

    `on_claimed` hears of each batch once its claim commits, so a backlog of many batches is submitted
    (by other worker processes) while the rest are still being claimed.
    """
    with ctx.sessions.begin() as session:
        escalate = tasks_to_escalate(session, ctx.config)
        groups = [g for g in waiting_groups(session, ctx.config.batch.max_requests)
                  if group_is_due(ctx.config, g)]
    claimed: list[ClaimedBatch] = []
    for group in groups:
        while True:
            with ctx.sessions.begin() as session:
                batch = claim_batch(session, ctx.config, group.provider, group.model)
            if batch is None:
                break
            log.info("claimed batch %s: %d tasks for %s/%s", batch.id, batch.request_count, batch.provider,
                     batch.model)
            claimed.append(batch)
            on_claimed(batch)
    return escalate, claimed


@contextmanager
def batch_lock(ctx: WorkerContext, step: str, batch_id: uuid.UUID) -> Iterator[bool]:
    """An advisory lock held by a transaction of its own connection, open (idle, holding no snapshot) for the
    whole step: one worker per (step, batch) at a time, released when the step ends or by Postgres itself if
    this process dies. Transaction-level, not session-level: through PgBouncer's transaction pooling a session
    lock would stay behind on a pooled server connection, where another client's transaction runs next."""
    key = f"tierbatch.{step}:{batch_id}"
    with ctx.engine.connect() as connection, connection.begin():
        yield bool(connection.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"), {"key": key}))


def submit_batch(ctx: WorkerContext, batch_id: uuid.UUID) -> float | None:
    """Build, upload and create the provider batch. Returns a delay when it should be tried later.

    No claim is submitted twice: a create attempt is counted before it is made, and a batch with a
    counted attempt first looks for a provider batch carrying its `tierbatch_batch_id`.
    """
    with batch_lock(ctx, "submit", batch_id) as got:
        if not got:
            return None  # another worker is submitting it
        with ctx.sessions.begin() as session:
            batch = session.get(ProviderBatch, batch_id)
        if batch is None or batch.status is not BatchStatus.PREPARING:
            return None
        if batch.not_before is not None and batch.not_before > datetime.now(UTC):
            return (batch.not_before - datetime.now(UTC)).total_seconds()
        api = ProviderBatches(ctx.providers, batch.provider)
        try:
            if batch.attempts > 0:
                found = api.find_batch_by_metadata(METADATA_KEY, str(batch.id), created_epoch(batch) - 300,
                                                   request_count=batch.request_count)
                if found is not None:
                    with ctx.sessions.begin() as session:
                        record_submitted(session, batch.id, found)
                    log.info("batch %s was already created as %s; recorded it", batch.id, found.id)
                    return None
            file_id = batch.input_file_id
            if file_id is None or not api.holds_input_file(file_id):  # a kind without files keeps them itself
                file_id = _build_and_upload(ctx, api, batch)
                if file_id is None:
                    return None
            with ctx.sessions.begin() as session:
                note_submission_attempt(session, batch.id)
            info = api.create_batch(file_id, {METADATA_KEY: str(batch.id)})
            ctx.pause("after_create")
        except ProviderError as exc:
            log.warning("batch %s: submission failed, will retry: %s", batch_id, exc.message)
            return ctx.config.batch.failed_batch_retry_seconds
        with ctx.sessions.begin() as session:
            record_submitted(session, batch.id, info)
        log.info("batch %s submitted as %s (%d lines)", batch.id, info.id, batch.request_count)
        return None


def _build_and_upload(ctx: WorkerContext, api: ProviderBatches, batch: ProviderBatch) -> str | None:
    with tempfile.TemporaryDirectory(prefix="tierbatch-") as tmp:
        path = Path(tmp) / f"tierbatch-{batch.id}.jsonl"
        with ctx.sessions.begin() as session:
            lines, size = write_batch_file(session, batch, path, ctx.config)
            if lines == 0:  # every task was escalated or cancelled meanwhile
                finish_batch(session, batch.id)
                return None
        file_id = api.upload_batch_file(str(path), path.name)
    ctx.pause("after_upload")
    with ctx.sessions.begin() as session:
        record_uploaded_file(session, batch.id, file_id, lines, size)
    return file_id


def poll_batches(ctx: WorkerContext) -> list[uuid.UUID]:
    """Ask the provider about every submitted batch; returns the ones ready to ingest."""
    with ctx.sessions.begin() as session:
        ids = batches_in(session, BatchStatus.SUBMITTED, limit=1000)
    ready = []
    for batch_id in ids:
        with ctx.sessions.begin() as session:
            batch = session.get(ProviderBatch, batch_id)
        if batch is None or batch.provider_batch_id is None:
            continue
        try:
            info = ProviderBatches(ctx.providers, batch.provider).retrieve_batch(batch.provider_batch_id)
        except ProviderError as exc:
            log.warning("batch %s: poll failed: %s", batch_id, exc.message)
            continue
        with ctx.sessions.begin() as session:
            if record_poll(session, batch_id, info):
                ready.append(batch_id)
    return ready


def ingest_batch(ctx: WorkerContext, batch_id: uuid.UUID,
                 resubmit: Callable[[uuid.UUID, float], None]) -> int:
    """Stream the output and error files into results and ledger rows, chunk by chunk.

    One ingester per batch at a time (a duplicate message for a batch being ingested does nothing);
    a crashed ingester's batch is resumed by the reconciler, and already-written lines are skipped.
    """
    with batch_lock(ctx, "ingest", batch_id) as got:
        if not got:
            return 0
        return _ingest_locked(ctx, batch_id, resubmit)


def _ingest_locked(ctx: WorkerContext, batch_id: uuid.UUID, resubmit: Callable[[uuid.UUID, float], None]) -> int:
    with ctx.sessions.begin() as session:
        batch = session.get(ProviderBatch, batch_id)
    if batch is None or batch.status is not BatchStatus.INGESTING:
        return 0
    if batch.provider_status is ProviderBatchStatus.FAILED:
        return _handle_refused_batch(ctx, batch, resubmit)
    api = ProviderBatches(ctx.providers, batch.provider)
    written = 0
    first_chunk = True
    # this thread reads, parses and prices the next chunk while up to `ingest_writers` writer threads
    # write the chunks before it, each in its own transaction on its own connection (psycopg releases
    # the GIL while it waits for Postgres, and each connection's work runs in its own Postgres backend,
    # on another core); chunks hold disjoint tasks, so the order in which they commit does not matter,
    # and at most `ingest_writers` + 1 are held in memory
    writers_at_once = ctx.config.batch.ingest_writers
    with collector_paused(), \
            ThreadPoolExecutor(max_workers=writers_at_once, thread_name_prefix="tierbatch-ingest") as writers:
        pending: deque[Future[IngestedChunk]] = deque()
        for lines in _chunks(api, batch, ctx.config.batch.ingest_chunk_lines):
            prepared = _prepare_chunk(ctx, batch, lines)
            while len(pending) >= writers_at_once:
                written += _after_chunk(ctx, pending.popleft().result())
                if first_chunk:
                    first_chunk = False
                    ctx.pause("mid_ingest")
            pending.append(writers.submit(_write_chunk, ctx, batch, prepared))
        while pending:
            written += _after_chunk(ctx, pending.popleft().result())
    with ctx.sessions.begin() as session:
        missing = tasks_left_in_batch(session, batch.id)
        if missing:
            reason = f"missing from the output of provider batch {batch.provider_batch_id} ({batch.provider_status})"
            return_lines_to_waiting(session, ctx.config, batch.id, dict.fromkeys(missing, reason))
    # quality monitor: its shadow tasks in this batch are final now; compared before the batch is done, so
    # a crash in between leaves the batch `ingesting`, and the resumed ingestion compares them (idempotent)
    settle_batch_shadows(ctx, batch.id)
    with ctx.sessions.begin() as session:
        finish_batch(session, batch.id)
    log.info("batch %s ingested: %d results, %d lines returned for retry", batch.id, written, len(missing))
    return written


def _chunks(api: ProviderBatches, batch: ProviderBatch, size: int) -> Iterator[list[str]]:
    # the first chunk is a fifth of the others: no writer works until it is prepared
    wanted = max(1, size // 5)
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        chunk: list[str] = []
        for line in api.iter_file_lines(file_id):
            chunk.append(line)
            if len(chunk) >= wanted:
                yield chunk
                chunk = []
                wanted = size
        if chunk:
            yield chunk


def _prepare_chunk(ctx: WorkerContext, batch: ProviderBatch, lines: list[str]) -> PreparedChunk:
    """Parse and price one chunk (it only reads the database), with the quality monitor's watch list and
    the response cache's candidates."""
    outcomes = classify_lines(lines)
    with ctx.sessions.begin() as session:
        # with the quality monitor's candidates (by the hash of their requests) and the response cache's
        # read in the same statement
        return prepare_outcomes(session, ctx.prices, batch, outcomes, ctx.config.quality, ctx.config.cache)


def _write_chunk(ctx: WorkerContext, batch: ProviderBatch, prepared: PreparedChunk) -> IngestedChunk:
    """Write one prepared chunk in its own transaction (in the writer thread)."""
    with ctx.sessions.begin() as session:
        ingested = write_prepared(session, ctx.config, batch, prepared, prepared.watch)
        # response cache: cacheable answers serve later identical requests (only the candidates are read)
        fill_from_succeeded_tasks(session, ctx.config, prepared.cacheable)
        touch_batch(session, batch.id)
    return ingested


def _after_chunk(ctx: WorkerContext, ingested: IngestedChunk) -> int:
    """Once a chunk has committed, back on the task's own thread: the shadow calls (Celery messages)
    find their tasks succeeded."""
    if ingested.succeeded:
        send_batch_shadows(ctx, ingested.succeeded)
    return ingested.written


def _handle_refused_batch(ctx: WorkerContext, batch: ProviderBatch,
                          resubmit: Callable[[uuid.UUID, float], None]) -> int:
    errors = json.loads(batch.error) if batch.error else []
    reason = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)) or "failed"
    with ctx.sessions.begin() as session:
        new_batches = split_failed_batch(session, ctx.config, batch, reason)
    log.warning("batch %s refused by the provider (%s); split into %d", batch.id, reason, len(new_batches))
    for new_id in new_batches:
        resubmit(new_id, ctx.config.batch.failed_batch_retry_seconds)
    return 0


def stale_batches(ctx: WorkerContext) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Batches left in `preparing` or `ingesting` by a crash: (to submit, to ingest)."""
    stale = ctx.config.reconciler.batch_stale_seconds
    with ctx.sessions.begin() as session:
        preparing = batches_in(session, BatchStatus.PREPARING, stale_seconds=stale, due_only=True)
        ingesting = batches_in(session, BatchStatus.INGESTING, stale_seconds=stale)
    return preparing, ingesting
