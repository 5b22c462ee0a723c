"""The life of one batch, driven by a background task per batch (it advances with nobody polling):

validating → (failed) | in_progress → finalizing → completed
                        in_progress → expired            (config `expire`: partial output)
validating / in_progress → cancelling → cancelled         (partial output)

Durations are read from the running config when each phase starts.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tierbatch.simulator.batch_input import batch_error, parse_input
from tierbatch.simulator.batch_output import CANCELLED, EXPIRED, BatchResults, compute_results, write_results
from tierbatch.simulator.batch_store import BatchRecord
from tierbatch.simulator.state import SimState

log = logging.getLogger(__name__)


async def _wait_or_cancel(batch: BatchRecord, seconds: float) -> bool:
    """Wait `seconds`; True as soon as a cancel is requested."""
    if batch.cancel_event.is_set():
        return True
    if seconds <= 0:
        await asyncio.sleep(0)
        return batch.cancel_event.is_set()
    try:
        await asyncio.wait_for(batch.cancel_event.wait(), seconds)
    except TimeoutError:
        return batch.cancel_event.is_set()
    return True


def _fail(batch: BatchRecord, errors: list[dict[str, object]]) -> None:
    batch.errors = errors
    batch.stamp("failed")


async def _write(state: SimState, batch: BatchRecord, results: BatchResults, done: int,
                 rest: tuple[str, str] | None) -> None:
    files = state.files
    out_id, err_id = files.new_id(), files.new_id()
    out_path, err_path = files.path_for(out_id), files.path_for(err_id)
    written = await asyncio.to_thread(write_results, results, done, out_path, err_path, rest)
    if written.output_lines:
        files.add(out_id, f"{batch.id}_output.jsonl", "batch_output", out_path)
        batch.output_file_id = out_id
    if written.error_lines:
        files.add(err_id, f"{batch.id}_error.jsonl", "batch_output", err_path)
        batch.error_file_id = err_id
    batch.completed = written.output_lines
    batch.failed = batch.total - written.output_lines
    batch.usage = written.usage
    state.stats.batch_lines_answered += written.output_lines
    keep = state.config.record_verdicts
    for answered in results.answers[:done]:
        if answered is not None:
            answer_id, family, reference = answered
            state.stats.record_answer(batch.model or "", answer_id, family, reference, keep)


async def _cancel(state: SimState, batch: BatchRecord) -> None:
    done = batch.done_count()
    await asyncio.sleep(max(0.0, state.config.batch.cancelling_seconds))
    if batch.results is not None:
        await _write(state, batch, batch.results, done, CANCELLED)
    batch.stamp("cancelled")


async def _prepare(state: SimState, batch: BatchRecord) -> BatchResults | None:
    """Validate the input file and answer every line; None when the batch failed or was cancelled."""
    stored = state.files.get(batch.input_file_id)
    if stored is None or not stored.path.exists():
        message = f"The input file {batch.input_file_id} no longer exists."
        _fail(batch, [batch_error("file_not_found", message)])
        return None
    cfg = state.config.batch
    parsed = await asyncio.to_thread(parse_input, stored.path, batch.endpoint, cfg.max_lines, cfg.max_bytes)
    if batch.cancel_event.is_set():
        await _cancel(state, batch)
        return None
    if parsed.errors:
        _fail(batch, parsed.errors)
        return None
    state.stats.prompt_cache_keys.update(parsed.prompt_cache_keys)
    assert parsed.model is not None
    cfg = state.config.batch
    limit = cfg.enqueued_token_limit
    batch.model = parsed.model
    if limit and state.batches.enqueued_tokens(parsed.model) + parsed.prompt_tokens > limit:
        _fail(batch, [batch_error(
            "token_limit_exceeded",
            f"Enqueued token limit reached for {parsed.model} in organization org-simulator. "
            f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches have been "
            "completed.")])
        return None
    batch.enqueued_tokens = parsed.prompt_tokens
    batch.total = len(parsed.lines)
    batch.progress_started = time.monotonic()
    batch.progress_seconds = cfg.in_progress_seconds
    batch.stamp("in_progress")
    return await asyncio.to_thread(
        compute_results, batch.id, parsed.lines, parsed.model, state.settings_for(parsed.model),
        state.prefix_cache, cfg.line_error_rate, cfg.line_error_kinds, batch.created_at,
    )


async def _run(state: SimState, batch: BatchRecord) -> None:
    if await _wait_or_cancel(batch, state.config.batch.validating_seconds):
        await _cancel(state, batch)
        return
    async with state.batches_answering:
        with state.gc_paused():  # parsing builds many small containers, freed before the GC resumes
            results = await _prepare(state, batch)
    if results is None:
        return
    batch.results = results
    cfg = state.config.batch
    expire, expire_share = cfg.expire, cfg.expire_completed_share
    assert batch.progress_started is not None
    remaining = batch.progress_started + batch.progress_seconds - time.monotonic()
    if await _wait_or_cancel(batch, remaining):
        await _cancel(state, batch)
        return
    if expire:
        await _write(state, batch, results, int(batch.total * expire_share), EXPIRED)
        batch.stamp("expired")
        return
    batch.stamp("finalizing")
    await _write(state, batch, results, batch.total, None)
    await asyncio.sleep(max(0.0, state.config.batch.finalizing_seconds))
    batch.stamp("completed")


async def run_batch(state: SimState, batch: BatchRecord) -> None:
    try:
        await _run(state, batch)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("batch %s crashed", batch.id)
        _fail(batch, [batch_error("server_error", "The batch could not be processed.")])
    finally:
        batch.results = None  # results live on in the files; free the memory
