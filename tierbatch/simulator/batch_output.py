"""Batch results: every line answered with the chat logic (no latency, no faults), in shuffled
order, a `line_error_rate` share failed on purpose, and the writing of output and error files.

Pure functions run in a worker thread; the prefix cache is the only shared object (thread-safe).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import Any

from tierbatch.simulator.answers import stable_hash, unit_hash
from tierbatch.simulator.batch_input import BatchLine
from tierbatch.simulator.completions import complete, completion_json, served_model, validate_chat_request
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.errors import OpenAIError, error_body
from tierbatch.simulator.tokens import PrefixCache

LINE_ERROR_KINDS = ("http_500", "http_400", "non_http")
EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")
CANCELLED = ("batch_cancelled", "This request was not executed because the batch was cancelled.")
_NO_USAGE = (0, 0, 0, 0)


@dataclass
class BatchResults:
    """One entry per request, in output order."""

    custom_ids: list[str]
    lines: list[bytes]  # the JSONL line (with newline) of an answered request
    failed: list[bool]  # goes to the error file
    failed_before: list[int]  # failed_before[k]: failures among the first k requests
    usage: list[tuple[int, int, int, int]]  # (input, cached, output, reasoning) tokens of a success
    # (answer id, task family, reference answer?) of a success, for the simulator's counters
    answers: list[tuple[str, str | None, bool | None] | None] = field(default_factory=list)


def _line(custom_id: str, status: int | None, body: dict[str, Any] | None,
          error: dict[str, str] | None) -> bytes:
    prefix = os.urandom(12).hex()
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": "req_" + prefix, "body": body}
    obj = {"id": "batch_req_" + prefix, "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _injected(kind: str, custom_id: str) -> bytes:
    if kind == "http_500":
        body = error_body("The server had an error while processing your request. Sorry about that!",
                          "server_error")
        return _line(custom_id, 500, body, None)
    if kind == "http_400":
        body = error_body("The request was rejected by the simulator (injected line error).",
                          "invalid_request_error")
        return _line(custom_id, 400, body, None)
    message = "The request could not be processed (injected line error)."
    return _line(custom_id, None, None, {"code": "server_error", "message": message})


def compute_results(batch_id: str, requests: Sequence[BatchLine], model: str, settings: ModelSettings,
                    cache: PrefixCache, line_error_rate: float, error_kinds: Sequence[str],
                    created: int) -> BatchResults:
    order = list(range(len(requests)))
    random.Random(stable_hash("shuffle", batch_id)).shuffle(order)
    served = served_model(model, settings)
    kinds = tuple(error_kinds) or LINE_ERROR_KINDS
    custom_ids: list[str] = []
    lines: list[bytes] = []
    failed: list[bool] = []
    usage: list[tuple[int, int, int, int]] = []
    answers: list[tuple[str, str | None, bool | None] | None] = []
    id_base = os.urandom(8).hex()
    for position, index in enumerate(order):
        request = requests[index]
        custom_id = request.custom_id
        custom_ids.append(custom_id)
        # an invalid body fails as a 400 whatever the injected error rate, as at the real service
        try:
            _, body = validate_chat_request(request.body)
        except OpenAIError as exc:
            body_400 = error_body(exc.message, exc.type, exc.param, exc.code)
            lines.append(_line(custom_id, exc.status, body_400, None))
            failed.append(True)
            usage.append(_NO_USAGE)
            answers.append(None)
            continue
        if line_error_rate > 0 and unit_hash("line-error", batch_id, custom_id) < line_error_rate:
            kind = kinds[stable_hash("line-error-kind", batch_id, custom_id) % len(kinds)]
            lines.append(_injected(kind, custom_id))
            failed.append(True)
            usage.append(_NO_USAGE)
            answers.append(None)
            continue
        answer, cached = complete(body, model, settings, cache)
        prefix = f"{id_base}{position:08x}"
        answer_id = f"chatcmpl-{prefix}"
        answers.append((answer_id, answer.family, answer.reference))
        body_json = completion_json(answer, served, cached, answer_id, created=created)
        lines.append(
            f'{{"id":"batch_req_{prefix}","custom_id":{_quote(custom_id)},"response":{{"status_code":200,'
            f'"request_id":"req_{prefix}","body":{body_json}}},"error":null}}\n'.encode()
        )
        failed.append(False)
        usage.append((answer.prompt_tokens, cached, answer.completion_tokens, answer.reasoning_tokens))
    failed_before = [0, *itertools.accumulate(int(f) for f in failed)]
    return BatchResults(custom_ids, lines, failed, failed_before, usage, answers)


@dataclass(frozen=True)
class WrittenFiles:
    output_lines: int
    error_lines: int
    usage: dict[str, Any]


def write_results(results: BatchResults, done: int, output_path: Path, error_path: Path,
                  rest: tuple[str, str] | None) -> WrittenFiles:
    """Write the first `done` results (successes to the output file, failures to the error file),
    and the requests not done to the error file with the non-HTTP error `rest` (code, message).
    A file that would be empty is not written."""
    pairs = list(zip(results.lines[:done], results.failed[:done], strict=True))
    out_lines = [line for line, bad in pairs if not bad]
    err_lines = [line for line, bad in pairs if bad]
    if rest is not None:
        code, message = rest
        err_lines.extend(_line(cid, None, None, {"code": code, "message": message})
                         for cid in results.custom_ids[done:])
    for path, content in ((output_path, out_lines), (error_path, err_lines)):
        if content:
            with open(path, "wb") as fh:
                fh.writelines(content)
    sums = [sum(col) for col in zip(*results.usage[:done], strict=True)] if done else [0, 0, 0, 0]
    input_tokens, cached, output_tokens, reasoning = sums
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }
    return WrittenFiles(len(out_lines), len(err_lines), usage)
