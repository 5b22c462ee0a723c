"""Batch input files: OpenAI's whole-file validation (a failure fails the batch with `errors.data`).

Pure functions over a file on disk, run in a worker thread: one pass, no per-line awaits.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbatch.simulator.tokens import count_tokens, prompt_text

MAX_REPORTED_ERRORS = 1000


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a valid input file. Only its bytes are kept (parsed again when it is answered): the
    parsed objects of a 50,000-line file took about 190 MB, its bytes about 35 MB."""

    line: int  # 1-based line number in the input file
    custom_id: str
    raw: bytes  # the line as it was in the file

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.raw)["body"]
        return body


@dataclass
class ParsedInput:
    lines: list[BatchLine] = field(default_factory=list)
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0  # estimated, for the enqueued-token limit
    prompt_cache_keys: Counter[str] = field(default_factory=Counter)  # lines per `prompt_cache_key`


def batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def count_lines(path: Path) -> int:
    """Requests in a JSONL file: its non-blank lines."""
    count = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                count += 1
    return count


def _line_problem(number: int, obj: Any, endpoint: str) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return batch_error("invalid_json_line", "This line is not a JSON object.", number)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return batch_error("missing_required_parameter", "Missing required parameter: 'custom_id'.", number,
                           "custom_id")
    method = obj.get("method")
    if method != "POST":
        return batch_error("invalid_method", f"The method must be 'POST', got {method!r}.", number, "method")
    url = obj.get("url")
    if url != endpoint:
        return batch_error("url_mismatch", f"The URL provided for this request ({url!r}) does not match the "
                           f"batch endpoint ({endpoint!r}).", number, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return batch_error("missing_required_parameter", "Missing required parameter: 'body'.", number,
                           "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return batch_error("missing_required_parameter", "Missing required parameter: 'body.model'.", number,
                           "body.model")
    return None


def parse_input(path: Path, endpoint: str, max_lines: int, max_bytes: int) -> ParsedInput:
    parsed = ParsedInput()
    errors = parsed.errors
    size = path.stat().st_size
    if size > max_bytes:
        errors.append(batch_error("file_too_large", f"The input file is {size} bytes; a batch input file "
                                  f"may be at most {max_bytes} bytes."))
        return parsed
    total = count_lines(path)
    if total == 0:
        errors.append(batch_error("empty_file", "The input file is empty."))
        return parsed
    if total > max_lines:
        errors.append(batch_error("too_many_tasks", f"The input file has {total} requests; a batch may "
                                  f"have at most {max_lines} requests."))
        return parsed
    seen: set[str] = set()
    tokens = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                errors.append(batch_error("invalid_json_line", "This line is not parseable as valid JSON.",
                                          number))
                continue
            problem = _line_problem(number, obj, endpoint)
            if problem is not None:
                errors.append(problem)
                continue
            custom_id: str = obj["custom_id"]
            if custom_id in seen:
                errors.append(batch_error(
                    "duplicate_custom_id",
                    f"The custom_id for this request ({custom_id!r}) is a duplicate of another request. The "
                    "custom_id parameter must be unique for each request in a batch.", number, "custom_id"))
                continue
            seen.add(custom_id)
            body: dict[str, Any] = obj["body"]
            model: str = body["model"]
            if parsed.model is None:
                parsed.model = model
            elif model != parsed.model:
                errors.append(batch_error(
                    "model_mismatch",
                    f"The model {model!r} does not match the model {parsed.model!r} of the other requests; "
                    "all requests in a batch must use the same model.", number, "body.model"))
                continue
            messages = body.get("messages")
            if isinstance(messages, list):
                tokens += count_tokens(prompt_text(messages))
            cache_key = body.get("prompt_cache_key")
            if isinstance(cache_key, str):
                parsed.prompt_cache_keys[cache_key] += 1
            parsed.lines.append(BatchLine(number, custom_id, raw))
    parsed.prompt_tokens = tokens
    if errors:
        parsed.lines = []
        parsed.prompt_cache_keys.clear()
    return parsed
