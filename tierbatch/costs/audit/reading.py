"""`tierbatch audit`: reading a call log or a Batch API pair into calls for the estimate.

The file is streamed one line at a time, so memory stays flat whatever its size (a Batch API pair keeps one
small entry per input line, see below). How each call is classified and priced, and the monthly figures:
tierbatch.costs.audit.estimate.

Inputs
------
- A **call log**: JSONL, one ``{"request": <chat completion body>, "response": <chat completion>}`` per line.
  These calls were made immediately, so they are priced at immediate prices.
- A **Batch API pair**: the input file (``{"custom_id", "method", "url", "body"}`` per line) and its output
  file (``{"id", "custom_id", "response": {"status_code", "body"}, "error"}``), joined by ``custom_id`` (the
  output order is not trusted). These calls were already batched: they are priced at batch prices. The input
  file is read first into ``custom_id → (line, task type, tier, requested model)`` (the prompt is classified
  then and not kept), then the output file is streamed against it.

Lines that cannot be used
-------------------------
Invalid JSON, not an object, no request or response, no messages, no usage, bad token counts; for a pair
also a missing or duplicate ``custom_id``, an output line for an unknown ``custom_id``, a failed request
(``error`` set or a status other than 200: not billed) and an input line without an output line. Each is
recorded as ``(file, line number, reason)`` and reading goes on. Blank lines are ignored. At most
``SKIPPED_KEPT`` reasons are kept (the count is always exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import TierbatchError
from tierbatch.base.states import Tier
from tierbatch.costs.audit.estimate import AuditOptions, Auditor, AuditReport, Call, FileRole
from tierbatch.ledger.pricing import TokenUsage

PROGRESS_EVERY_LINES = 1_000

ProgressCallback = Callable[[int], None]


class AuditError(TierbatchError):
    """The audit cannot run at all (a file that cannot be opened or read)."""


# --- reading -------------------------------------------------------------------------------------------

def _lines(path: Path, on_progress: ProgressCallback | None, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; reports bytes read (plus `offset`) now and then."""
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise AuditError(f"{path}: cannot open the file ({exc.strerror or exc})") from None
    done = 0
    with stream:
        number = 0
        while True:
            try:
                raw = stream.readline()
            except OSError as exc:
                raise AuditError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
            if not raw:
                break
            number += 1
            done += len(raw)
            if on_progress is not None and number % PROGRESS_EVERY_LINES == 0:
                on_progress(offset + done)
            if raw.strip():
                yield number, raw
    if on_progress is not None:
        on_progress(offset + done)


def _decode(raw: bytes) -> dict[str, Any] | str:
    """The line's JSON object, or why it is not one."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return "not UTF-8 text" if "UTF-8" in exc.msg else f"invalid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return "not a JSON object"
    return value


def _count(container: Mapping[str, Any], key: str, where: str) -> int | str:
    value = container.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"{where}.{key} is not a non-negative integer"
    return value


def parse_usage(usage: Any, where: str = "response.usage") -> TokenUsage | str:
    """OpenAI chat completion usage → TokenUsage, or why it cannot be read."""
    if not isinstance(usage, dict):
        return f"no {where}"
    counts: dict[str, int] = {}
    for key in ("prompt_tokens", "completion_tokens"):
        if key not in usage:
            return f"{where} has no {key}"
        value = _count(usage, key, where)
        if isinstance(value, str):
            return value
        counts[key] = value
    details = {"cached_tokens": ("prompt_tokens_details", "prompt_tokens"),
               "reasoning_tokens": ("completion_tokens_details", "completion_tokens")}
    for key, (section, total) in details.items():
        part = usage.get(section)
        value = _count(part, key, f"{where}.{section}") if isinstance(part, dict) else 0
        if isinstance(value, str):
            return value
        if value > counts[total]:
            return f"{where}.{section}.{key} is more than {total}"
        counts[key] = value
    return TokenUsage(input_tokens=counts["prompt_tokens"], cached_tokens=counts["cached_tokens"],
                      output_tokens=counts["completion_tokens"], reasoning_tokens=counts["reasoning_tokens"])


def _model(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _created(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return int(value)


def _call_from(auditor: Auditor, request: Mapping[str, Any], response: Mapping[str, Any],
               request_where: str, response_where: str) -> Call | str:
    classified = auditor.classify(request, request_where)
    if isinstance(classified, str):
        return classified
    usage = parse_usage(response.get("usage"), f"{response_where}.usage")
    if isinstance(usage, str):
        return usage
    task_type, tier = classified
    return Call(task_type, tier, _model(request.get("model")), _model(response.get("model")), usage,
                _created(response.get("created")))


def audit_log(path: Path, config: AppConfig, options: AuditOptions, *,
              on_progress: ProgressCallback | None = None) -> AuditReport:
    """Audit a JSONL call log of `{"request", "response"}` lines (immediate calls)."""
    auditor = Auditor(config, options, batch_mode=False)
    for number, raw in _lines(path, on_progress):
        auditor.lines_read += 1
        record = _decode(raw)
        if isinstance(record, str):
            auditor.skip("log", number, record)
            continue
        request, response = record.get("request"), record.get("response")
        if not isinstance(request, dict):
            hint = (" (a Batch API line: give the input file as LOGFILE and the output file with --output)"
                    if "custom_id" in record else "")
            auditor.skip("log", number, f"no 'request' object{hint}")
            continue
        if not isinstance(response, dict):
            auditor.skip("log", number, "no 'response' object")
            continue
        call = _call_from(auditor, request, response, "request", "response")
        if isinstance(call, str):
            auditor.skip("log", number, call)
        else:
            auditor.add(call)
    return auditor.report({"log": str(path)})


@dataclass(slots=True)
class _Pending:
    """What is kept of one Batch API input line until its output line arrives."""

    line: int
    task_type: str
    tier: Tier
    model: str | None
    joined: bool = field(default=False)


def _keyed_record(auditor: Auditor, side: FileRole, number: int, raw: bytes) -> tuple[dict[str, Any], str] | None:
    """A Batch API line as (record, custom_id); None (the line reported as skipped) when it has neither."""
    auditor.lines_read += 1
    record = _decode(raw)
    if isinstance(record, str):
        auditor.skip(side, number, record)
        return None
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        auditor.skip(side, number, "no custom_id")
        return None
    return record, custom_id


def _read_batch_input(auditor: Auditor, path: Path, on_progress: ProgressCallback | None) -> dict[str, _Pending]:
    pending: dict[str, _Pending] = {}
    task_types: dict[str, str] = {}  # one string object per task type
    for number, raw in _lines(path, on_progress):
        found = _keyed_record(auditor, "input", number, raw)
        if found is None:
            continue
        record, custom_id = found
        if custom_id in pending:
            auditor.skip("input", number, f"duplicate custom_id {custom_id!r} (first on line "
                                          f"{pending[custom_id].line})")
            continue
        body = record.get("body")
        if not isinstance(body, dict):
            hint = (" (an output line? give the input file as LOGFILE and the output file with --output)"
                    if "response" in record else "")
            auditor.skip("input", number, f"no 'body' object{hint}")
            continue
        classified = auditor.classify(body, "body")
        if isinstance(classified, str):
            auditor.skip("input", number, classified)
            continue
        task_type, tier = classified
        pending[custom_id] = _Pending(number, task_types.setdefault(task_type, task_type), tier,
                                      _model(body.get("model")))
    return pending


def _failure(record: Mapping[str, Any], response: Any) -> str | None:
    error = record.get("error")
    if error:
        code = (error.get("code") or error.get("message")) if isinstance(error, dict) else error
        return f"request failed ({code}): not billed"
    if not isinstance(response, dict):
        return "no 'response' object"
    status = response.get("status_code")
    if status != 200:
        return f"request failed (status {status}): not billed"
    return None


def audit_batch_pair(input_path: Path, output_path: Path, config: AppConfig, options: AuditOptions, *,
                     on_progress: ProgressCallback | None = None) -> AuditReport:
    """Audit a Batch API input file and its output file, joined by custom_id (batch prices)."""
    auditor = Auditor(config, options, batch_mode=True)
    pending = _read_batch_input(auditor, input_path, on_progress)
    try:
        offset = input_path.stat().st_size
    except OSError:
        offset = 0
    for number, raw in _lines(output_path, on_progress, offset):
        found = _keyed_record(auditor, "output", number, raw)
        if found is None:
            continue
        record, custom_id = found
        entry = pending.get(custom_id)
        if entry is None:
            auditor.skip("output", number, f"custom_id {custom_id!r} is not a usable line of the input file")
            continue
        if entry.joined:
            auditor.skip("output", number, f"a second output line for custom_id {custom_id!r}")
            continue
        entry.joined = True
        response = record.get("response")
        failure = _failure(record, response)
        if failure is not None:
            auditor.skip("output", number, failure)
            continue
        body = response.get("body") if isinstance(response, dict) else None
        if not isinstance(body, dict):
            auditor.skip("output", number, "no response.body object")
            continue
        usage = parse_usage(body.get("usage"), "response.body.usage")
        if isinstance(usage, str):
            auditor.skip("output", number, usage)
            continue
        auditor.add(Call(entry.task_type, entry.tier, entry.model, _model(body.get("model")), usage,
                         _created(body.get("created"))))
    for custom_id, entry in pending.items():
        if not entry.joined:
            auditor.skip("input", entry.line, f"no output line for custom_id {custom_id!r}")
    return auditor.report({"input": str(input_path), "output": str(output_path)})


def audit_files(paths: Sequence[Path], config: AppConfig, options: AuditOptions, *,
                on_progress: ProgressCallback | None = None) -> AuditReport:
    """One path: a call log; two: a Batch API input file and its output file."""
    if len(paths) == 1:
        return audit_log(paths[0], config, options, on_progress=on_progress)
    if len(paths) == 2:
        return audit_batch_pair(paths[0], paths[1], config, options, on_progress=on_progress)
    raise ValueError("audit_files takes a log, or a Batch API input and output file")
