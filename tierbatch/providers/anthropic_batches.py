"""Anthropic's Message Batches behind the OpenAI batch shape (`tierbatch.providers.adapter.BatchAdapter`),
so the worker's batch path (`tierbatch.worker.batch`) and ingestion (`tierbatch.batching.ingest`) do not
change.

- Upload: Anthropic takes a batch's requests inline, not as a file. `upload_batch_file` reads the
  OpenAI batch lines and translates each body (`tierbatch.providers.anthropic_messages`) into a
  `{"custom_id", "params"}` request, kept by this object until `create_batch`; the "file id" it returns
  names them (`inline-<sha256 of the file>`). `holds_input_file` says whether this object still holds
  them: a worker that crashed between upload and create has lost them, and rebuilds the file. A line with
  no Anthropic equivalent is left out (its task is then missing from the output and goes back to waiting,
  until its batch attempts run out). At most 100,000 requests and 256 MB a batch.
- Custom ids: `<task id, 32 hex>-<tag, 16 hex>[-j]`, at most 64 characters: the tag is a hash of the
  batch's metadata (Anthropic batches carry none), `-j` marks a `json_schema` line, whose answer is the
  input of the forced tool named `json_response`.
- Status: `in_progress` and `canceling` are OpenAI's `in_progress` and `cancelling`; `ended` is
  `completed` (or `cancelled` once a cancel was asked). An ended batch's output "file" is the batch id:
  `iter_file_lines` streams its results JSONL and yields each line in OpenAI's batch output shape
  (`{"custom_id", "response": {"status_code", "body"}, "error"}`, the message translated to a chat
  completion; an `errored` line's `invalid_request_error` as a 400, other errors as a 500; `canceled`
  and `expired` lines as line errors, worth another batch).
- Recovery after a crash between create and store (`find_batch_by_metadata`): the batches created from
  `created_after` on are listed, newest first. An ended one is ours when the custom id of its first result
  carries our tag. One still running cannot be told apart (its requests are not readable until it ends):
  unless it has more requests than ours (`request_count`, when given), the search raises a retryable
  error, so the worker asks again later rather than creating a second batch; once every such batch has
  ended, ours is found, or known not to exist.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import anthropic

from tierbatch.base.errors import PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.providers.adapter import ProviderBatchInfo
from tierbatch.providers.anthropic_errors import map_anthropic_error
from tierbatch.providers.anthropic_messages import (
    DEFAULT_RESPONSE_TOOL,
    Untranslatable,
    to_chat_completion,
    to_messages_params,
)

MAX_REQUESTS = 100_000
MAX_BYTES = 256 * 1024 * 1024
INLINE_PREFIX = "inline-"
JSON_MARK = "-j"
_STATUSES = {"in_progress": "in_progress", "canceling": "cancelling"}


def metadata_tag(metadata: Mapping[str, str]) -> str:
    """16 hex digits standing for a batch's metadata in each of its custom ids."""
    return hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode()).hexdigest()[:16]


def _task_of(custom_id: str) -> str:
    """Our task id (as `uuid` spells it) of a custom id, or the custom id itself if it is not ours."""
    try:
        return str(uuid.UUID(hex=custom_id[:32]))
    except ValueError:
        return custom_id


def _batch_info(batch: Any) -> ProviderBatchInfo:
    status = _STATUSES.get(batch.processing_status)
    if status is None:  # ended
        status = "cancelled" if batch.cancel_initiated_at is not None else "completed"
    return ProviderBatchInfo(id=batch.id, status=status, output_file_id=batch.id if status in ("completed",
                             "cancelled") else None, error_file_id=None, errors=[], metadata={},
                             created_at=int(batch.created_at.timestamp()))


def _line_error(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def output_line(result: Mapping[str, Any]) -> dict[str, Any]:
    """One Anthropic batch result as an OpenAI batch output line."""
    custom_id = str(result.get("custom_id") or "")
    task = _task_of(custom_id)
    outcome = result.get("result") or {}
    kind = outcome.get("type")
    if kind == "succeeded":
        tool = DEFAULT_RESPONSE_TOOL if custom_id.endswith(JSON_MARK) else None
        body = to_chat_completion(outcome.get("message") or {}, tool)
        return {"custom_id": task, "response": {"status_code": 200, "body": body}, "error": None}
    if kind == "errored":
        error = (outcome.get("error") or {}).get("error") or {}
        error_type = str(error.get("type") or "api_error")
        status = 400 if error_type == "invalid_request_error" else 500
        return {"custom_id": task, "response": {"status_code": status, "body": {"error": {
            "message": str(error.get("message") or error_type), "type": error_type, "code": error_type}}},
            "error": None}
    if kind == "canceled":
        return _line_error(task, "batch_cancelled", "the batch was cancelled before this request ran")
    return _line_error(task, "batch_expired", "the batch expired before this request ran")


class AnthropicBatches:
    """Message Batches calls of one provider; anthropic errors mapped like chat errors."""

    def __init__(self, client: anthropic.Anthropic, provider: str, default_max_tokens: int) -> None:
        self._client = client
        self._provider = provider
        self._default_max_tokens = default_max_tokens
        self._inputs: dict[str, list[dict[str, Any]]] = {}  # "file id" → requests without custom ids' tags

    def _mapped(self, exc: anthropic.AnthropicError) -> ProviderError:
        return map_anthropic_error(exc, self._provider, "batch")

    def upload_batch_file(self, path: str, filename: str) -> str:
        digest = hashlib.sha256()
        requests = []
        with open(path, "rb") as handle:
            for raw in handle:
                digest.update(raw)
                line = json.loads(raw)
                body = dict(line.get("body") or {})
                model = str(body.pop("model", ""))
                cache_key = body.get("prompt_cache_key")
                json_line = (body.get("response_format") or {}).get("type") == "json_schema"
                try:
                    params = to_messages_params(body, model, self._default_max_tokens, cache_key,
                                                DEFAULT_RESPONSE_TOOL if json_line else None).params
                except Untranslatable:
                    continue  # missing from the output: back to waiting (see the module docstring)
                task = uuid.UUID(str(line["custom_id"])).hex
                requests.append({"task": task, "mark": JSON_MARK if json_line else "", "params": params})
        file_id = INLINE_PREFIX + digest.hexdigest()[:32]
        self._inputs[file_id] = requests
        return file_id

    def holds_input_file(self, file_id: str) -> bool:
        return file_id in self._inputs

    def create_batch(self, input_file_id: str, metadata: dict[str, str]) -> ProviderBatchInfo:
        held = self._inputs.get(input_file_id)
        if held is None:
            raise RetryableProviderError(f"{self._provider}/batch: the requests of {input_file_id} are not held "
                                         "here (uploaded by another process): the file must be rebuilt",
                                         provider=self._provider, model="batch")
        tag = metadata_tag(metadata)
        requests = [{"custom_id": f"{r['task']}-{tag}{r['mark']}", "params": r["params"]} for r in held]
        size = len(json.dumps(requests, ensure_ascii=False).encode())
        if len(requests) > MAX_REQUESTS or size > MAX_BYTES:
            raise PermanentProviderError(f"{self._provider}/batch: {len(requests)} requests, {size} bytes: over "
                                         "Anthropic's limits of a batch", provider=self._provider, model="batch")
        try:
            batch = self._client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        except anthropic.AnthropicError as exc:
            raise self._mapped(exc) from exc
        del self._inputs[input_file_id]
        return _batch_info(batch)

    def retrieve_batch(self, batch_id: str) -> ProviderBatchInfo:
        try:
            return _batch_info(self._client.messages.batches.retrieve(batch_id))
        except anthropic.AnthropicError as exc:
            raise self._mapped(exc) from exc

    def cancel_batch(self, batch_id: str) -> ProviderBatchInfo:
        try:
            return _batch_info(self._client.messages.batches.cancel(batch_id))
        except anthropic.AnthropicError as exc:
            raise self._mapped(exc) from exc

    def find_batch_by_metadata(self, key: str, value: str, created_after: int, *,
                               request_count: int | None = None) -> ProviderBatchInfo | None:
        tag = metadata_tag({key: value})
        undecided = 0
        try:
            for batch in self._client.messages.batches.list(limit=100):
                if int(batch.created_at.timestamp()) < created_after:
                    break
                counts = batch.request_counts
                total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
                if request_count is not None and total > request_count:
                    continue  # more requests than ours: not ours
                if batch.processing_status != "ended":
                    undecided += 1
                    continue
                if self._first_tag(batch.id) == tag:
                    return _batch_info(batch)
        except anthropic.AnthropicError as exc:
            raise self._mapped(exc) from exc
        if undecided:
            raise RetryableProviderError(f"{self._provider}/batch: {undecided} batch(es) created since the attempt "
                                         "are still running; whether one is ours is known once they end",
                                         provider=self._provider, model="batch")
        return None

    def _first_tag(self, batch_id: str) -> str | None:
        results = self._client.messages.batches.results(batch_id)
        try:
            for result in results:
                return result.custom_id[33:49]
        finally:
            results.close()
        return None

    def iter_file_lines(self, file_id: str) -> Iterator[str]:
        """The batch's results, streamed, each in OpenAI's batch output shape."""
        try:
            results = self._client.messages.batches.results(file_id)
            try:
                for result in results:
                    yield json.dumps(output_line(result.model_dump(mode="json")), ensure_ascii=False)
            finally:
                results.close()
        except anthropic.AnthropicError as exc:
            raise self._mapped(exc) from exc
