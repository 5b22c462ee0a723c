"""The life of one message batch, driven by a background task (it advances with nobody polling):

in_progress → ended                    (every request answered: succeeded or errored)
in_progress → ended                    (config `batch.expire`: `expire_completed_share` answered, the rest expired)
in_progress → canceling → ended        (the requests processed before the cancel answered, the rest canceled)

It reuses the chat side's batch knobs: processing lasts `validating_seconds + in_progress_seconds +
finalizing_seconds` (the phases of an OpenAI batch), canceling `cancelling_seconds`; `line_error_rate`
and `line_error_kinds` error some requests on purpose (`http_500` an api_error, `http_400` an
invalid_request_error, `non_http` an overloaded_error). Every request is answered with the Messages logic
(no latency, no faults), its params checked then: bad params end as an errored invalid_request_error.
Results are written in a shuffled order, as Anthropic does not keep the request order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence

from tierbatch.simulator.answers import stable_hash, unit_hash
from tierbatch.simulator.anthropic_errors import AnthropicError, anthropic_error_body
from tierbatch.simulator.completions import served_model
from tierbatch.simulator.message_batch_store import BatchRequest, MessageBatchRecord
from tierbatch.simulator.messages_answer import answer_message, message_body
from tierbatch.simulator.messages_request import validate_messages_request
from tierbatch.simulator.state import SimState

log = logging.getLogger(__name__)

_INJECTED = {
    "http_500": ("api_error", "Internal server error (injected request error)."),
    "http_400": ("invalid_request_error", "The request was rejected by the simulator (injected request error)."),
    "non_http": ("overloaded_error", "Overloaded (injected request error)."),
}
Result = tuple[str, str, bytes]  # (custom_id, result kind, the JSONL line)


def _line(custom_id: str, result: dict[str, object]) -> bytes:
    return json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False,
                      separators=(",", ":")).encode() + b"\n"


def _errored(custom_id: str, type_: str, message: str) -> Result:
    return custom_id, "errored", _line(custom_id, {"type": "errored", "error": anthropic_error_body(type_, message)})


def compute_results(state: SimState, batch_id: str, requests: Sequence[BatchRequest], line_error_rate: float,
                    error_kinds: Sequence[str]) -> list[Result]:
    """Every request's result, in output order (pure but for the thread-safe prefix cache)."""
    order = list(range(len(requests)))
    random.Random(stable_hash("shuffle", batch_id)).shuffle(order)
    kinds = tuple(error_kinds) or tuple(_INJECTED)
    out: list[Result] = []
    for index in order:
        request = requests[index]
        custom_id = request.custom_id
        try:
            model, params = validate_messages_request(request.params)
        except AnthropicError as exc:
            out.append(_errored(custom_id, exc.type, exc.message))
            continue
        if line_error_rate > 0 and unit_hash("line-error", batch_id, custom_id) < line_error_rate:
            kind = kinds[stable_hash("line-error-kind", batch_id, custom_id) % len(kinds)]
            out.append(_errored(custom_id, *_INJECTED[kind]))
            continue
        settings = state.settings_for(model)
        answer = answer_message(params, model, settings, state.prefix_cache)
        message = message_body(answer, served_model(model, settings), service_tier="batch")
        out.append((custom_id, "succeeded", _line(custom_id, {"type": "succeeded", "message": message})))
    return out


def _end(batch: MessageBatchRecord, results: list[Result], done: int, rest: str) -> None:
    lines = []
    for position, (custom_id, kind, line) in enumerate(results):
        if position >= done:
            kind, line = rest, _line(custom_id, {"type": rest})
        batch.counts[kind] += 1
        lines.append(line)
    batch.results = b"".join(lines)
    batch.ended_at = time.time()
    batch.processing_status = "ended"


async def _wait_or_cancel(batch: MessageBatchRecord, seconds: float) -> bool:
    """Wait `seconds`; True as soon as a cancel is requested."""
    try:
        await asyncio.wait_for(batch.cancel_event.wait(), max(seconds, 0.0))
    except TimeoutError:
        return batch.cancel_event.is_set()
    return True


async def _run(state: SimState, batch: MessageBatchRecord) -> None:
    cfg = state.config.batch
    batch.processing_started = time.monotonic()
    batch.processing_seconds = cfg.validating_seconds + cfg.in_progress_seconds + cfg.finalizing_seconds
    results = await asyncio.to_thread(compute_results, state, batch.id, batch.requests, cfg.line_error_rate,
                                      cfg.line_error_kinds)
    remaining = batch.processing_started + batch.processing_seconds - time.monotonic()
    if await _wait_or_cancel(batch, remaining):
        done = int(len(results) * batch.progress_share())
        await asyncio.sleep(max(0.0, state.config.batch.cancelling_seconds))
        _end(batch, results, done, "canceled")
        return
    cfg = state.config.batch
    if cfg.expire:
        _end(batch, results, int(len(results) * cfg.expire_completed_share), "expired")
        return
    _end(batch, results, len(results), "canceled")


async def run_message_batch(state: SimState, batch: MessageBatchRecord) -> None:
    try:
        await _run(state, batch)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("message batch %s crashed", batch.id)
        crashed = [_errored(r.custom_id, "api_error", "The request could not be processed.")
                   for r in batch.requests]
        batch.counts.clear()
        _end(batch, crashed, len(crashed), "errored")
