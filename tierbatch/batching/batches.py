"""The batch path: claim waiting tasks into a batch, build its JSONL, record the
provider's batch, ingest its output and error files in bulk.

Each function takes a session and never commits; the worker owns the transactions. Guards on
`status` and `batch_id` make every step safe to run twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.states import BatchStatus, ProviderBatchStatus, TaskStatus, Tier
from tierbatch.db.bulk_sql import COPY_INGEST_ROWS, CREATE_INGEST_TABLE
from tierbatch.db.models import ProviderBatch, Task
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.providers.client import (
    RETRYABLE_STATUS,
    ProviderBatchInfo,
    output_from_body,
    prompt_cache_key,
    usage_from_body,
)
from tierbatch.tasks import transitions
from tierbatch.tasks.labels import label_error

TERMINAL_PROVIDER_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
ENDPOINT = "/v1/chat/completions"
METADATA_KEY = "tierbatch_batch_id"
# JSONL envelope around each request body, for the byte estimate made while claiming: custom_id,
# method, url (about 140 bytes) and a `prompt_cache_key` of up to 64 characters (about 85 bytes)
_ENVELOPE_BYTES = 225


@dataclass(frozen=True, slots=True)
class Group:
    provider: str
    model: str
    waiting: int
    oldest_age_seconds: float
    approx_bytes: int


def waiting_groups(session: Session) -> list[Group]:
    rows = session.execute(text(
        "SELECT provider, model, count(*) AS waiting, "
        "       extract(epoch FROM now() - min(created_at)) AS age, "
        "       sum(pg_column_size(request)) AS bytes "
        "FROM tasks WHERE status = 'waiting_batch' GROUP BY provider, model"
    )).all()
    return [Group(r.provider, r.model, int(r.waiting), float(r.age or 0), int(r.bytes or 0)) for r in rows]


def group_is_due(config: AppConfig, group: Group) -> bool:
    limits = config.batch
    return (group.waiting >= limits.max_requests or group.approx_bytes >= limits.max_bytes
            or group.oldest_age_seconds >= limits.max_wait_seconds)


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    id: uuid.UUID
    provider: str
    model: str
    request_count: int


def claim_batch(session: Session, config: AppConfig, provider: str, model: str) -> ClaimedBatch | None:
    """Move up to `max_requests` waiting tasks of one (provider, model) into a new `preparing` batch.

    `FOR UPDATE SKIP LOCKED` in the transaction that creates the batch row and links its tasks,
    so two workers never put one task in two batches. A partial group is only flushed once its
    oldest task has waited `max_wait_seconds`.
    """
    limits = config.batch
    locked = session.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"tierbatch.assemble:{provider}/{model}"})
    if not locked:
        return None  # another assembler is working on this group right now
    rows = session.execute(text(
        "SELECT id, octet_length(request::text) AS size, "
        "       extract(epoch FROM now() - created_at) AS age "
        "FROM tasks WHERE status = 'waiting_batch' AND provider = :provider AND model = :model "
        "ORDER BY created_at, id LIMIT :limit FOR UPDATE SKIP LOCKED"
    ), {"provider": provider, "model": model, "limit": limits.max_requests}).all()
    if not rows:
        return None
    budget = int(limits.max_bytes * 0.95)  # the real file must stay under the provider's limit
    chosen: list[uuid.UUID] = []
    total = 0
    for row in rows:
        size = int(row.size) + _ENVELOPE_BYTES + len(model)
        if chosen and total + size > budget:
            break
        chosen.append(row.id)
        total += size
    full = len(chosen) == limits.max_requests or len(chosen) < len(rows)
    oldest = max(float(r.age) for r in rows)
    if not full and oldest < limits.max_wait_seconds:
        return None
    batch_id = uuid.uuid4()
    session.add(ProviderBatch(id=batch_id, provider=provider, model=model, status=BatchStatus.PREPARING,
                              request_count=len(chosen), byte_size=total, attempts=0))
    session.flush()
    transitions.claim_for_batch(session, batch_id, chosen)
    return ClaimedBatch(batch_id, provider, model, len(chosen))


def write_batch_file(session: Session, batch: ProviderBatch, path: Path, config: AppConfig | None = None
                     ) -> tuple[int, int]:
    """Stream the batch's JSONL to `path`; returns (lines, bytes). One line per task still in it.

    Each line's body carries the task's `prompt_cache_key` (`tierbatch.providers.client.prompt_cache_key`: per task
    type and tenant) unless its request brings its own, or `config` says the batch's provider does not
    take one (without `config`, keys are sent: the provider default).
    """
    keyed = config is None or config.provider(batch.provider).prompt_cache_key
    prefix = '{"custom_id":"%s","method":"POST","url":"' + ENDPOINT + '","body":{"model":' + json.dumps(
        batch.model) + ","
    keys: dict[tuple[str, uuid.UUID], str] = {}  # the key's JSON and a comma, per (task type, tenant)
    lines = 0
    size = 0
    result = session.execute(
        text("SELECT id, request::text AS body, task_type, tenant_id, request ? 'prompt_cache_key' AS has_key "
             "FROM tasks WHERE batch_id = :batch AND status = 'in_batch' ORDER BY id"),
        {"batch": batch.id},
        execution_options={"yield_per": 5000},
    )
    with path.open("w", encoding="utf-8") as handle:
        for row in result:
            # splice the stored request object after "model": the body is {"model": ..., **request}
            key = ""
            if keyed and not row.has_key and len(row.body) > 2:
                key = keys.get((row.task_type, row.tenant_id), "")
                if not key:
                    key = keys[(row.task_type, row.tenant_id)] = '"prompt_cache_key":' + json.dumps(
                        prompt_cache_key(row.task_type, row.tenant_id)) + ","
            line = (prefix % row.id) + key + row.body[1:] + "}\n"
            handle.write(line)
            lines += 1
            size += len(line.encode())
    return lines, size


def batch_for_update(session: Session, batch_id: uuid.UUID) -> ProviderBatch | None:
    return session.get(ProviderBatch, batch_id, with_for_update=True)


def record_uploaded_file(session: Session, batch_id: uuid.UUID, file_id: str, lines: int, size: int) -> None:
    session.execute(update(ProviderBatch).where(ProviderBatch.id == batch_id,
                                                ProviderBatch.status == BatchStatus.PREPARING)
                    .values(input_file_id=file_id, request_count=lines, byte_size=size, updated_at=func.now()))


def note_submission_attempt(session: Session, batch_id: uuid.UUID) -> int:
    """Count a create attempt *before* calling the provider, so a retry knows to look first."""
    return int(session.scalar(
        update(ProviderBatch).where(ProviderBatch.id == batch_id)
        .values(attempts=ProviderBatch.attempts + 1, updated_at=func.now())
        .returning(ProviderBatch.attempts)
    ) or 0)


def record_submitted(session: Session, batch_id: uuid.UUID, info: ProviderBatchInfo) -> bool:
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id, ProviderBatch.status == BatchStatus.PREPARING)
        .values(status=BatchStatus.SUBMITTED, provider_batch_id=info.id,
                provider_status=ProviderBatchStatus(info.status), submitted_at=func.now(), updated_at=func.now())
        .returning(ProviderBatch.id)
    ).first()
    return moved is not None


def record_poll(session: Session, batch_id: uuid.UUID, info: ProviderBatchInfo) -> bool:
    """Store the provider's status; a terminal one moves the batch to `ingesting`. True if it did."""
    terminal = info.status in TERMINAL_PROVIDER_STATUSES
    values: dict[str, Any] = {"provider_status": ProviderBatchStatus(info.status), "updated_at": func.now()}
    if terminal:
        values.update(status=BatchStatus.INGESTING, output_file_id=info.output_file_id,
                      error_file_id=info.error_file_id,
                      error=json.dumps(info.errors) if info.errors else None)
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id, ProviderBatch.status == BatchStatus.SUBMITTED)
        .values(**values).returning(ProviderBatch.id)
    ).first()
    return terminal and moved is not None


# --- ingestion -------------------------------------------------------------------------------------


@dataclass
class LineOutcomes:
    """One chunk of output/error lines, sorted into what happens to each task."""

    successes: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)  # task id → response body
    retryable: dict[uuid.UUID, str] = field(default_factory=dict)  # task id → error message
    permanent: dict[uuid.UUID, str] = field(default_factory=dict)


def _error_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            code = inner.get("code")
            return f"{code}: {inner['message']}" if code else str(inner["message"])
    return fallback


def classify_lines(lines: Iterable[str]) -> LineOutcomes:
    outcomes = LineOutcomes()
    for raw in lines:
        try:
            line = orjson.loads(raw)
            task_id = uuid.UUID(str(line["custom_id"]))
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours: nothing to join it with
        response = line.get("response")
        if isinstance(response, dict) and response.get("status_code") == 200:
            outcomes.successes[task_id] = response.get("body") or {}
        elif isinstance(response, dict):
            status = int(response.get("status_code") or 0)
            message = f"batch line HTTP {status}: " + _error_message(response.get("body"), "no message")
            target = outcomes.retryable if status in RETRYABLE_STATUS or status >= 500 else outcomes.permanent
            target[task_id] = message
        else:
            error = line.get("error") or {}
            # non-HTTP line errors (expired, cancelled, internal) are worth another batch
            outcomes.retryable[task_id] = "batch line error: " + _error_message({"error": error}, "unknown")
    return outcomes


@dataclass(frozen=True, slots=True)
class SucceededTask:
    """A task that one ingested chunk moved to `succeeded` (for the quality monitor's sampling)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    task_type: str
    tier: Tier


@dataclass
class IngestedChunk:
    written: int = 0  # results written (tasks moved to succeeded or failed, each with its ledger row)
    succeeded: list[SucceededTask] = field(default_factory=list)  # of the `watch` ids only


@dataclass
class PreparedChunk:
    """One chunk's lines, ready to write: the success rows priced and checked in Python
    (`prepare_outcomes`), so that a worker can build the next chunk while this one is written."""

    copy_data: bytes = b""  # `ingest_rows` as COPY text (bulk_sql.INGEST_COLUMNS), a line per success
    success_ids: list[uuid.UUID] = field(default_factory=list)
    retryable: dict[uuid.UUID, str] = field(default_factory=dict)
    permanent: dict[uuid.UUID, str] = field(default_factory=dict)


def prepare_outcomes(session: Session, prices: PriceBook, batch: ProviderBatch, outcomes: LineOutcomes
                     ) -> PreparedChunk:
    """The Python half of ingesting a chunk: price each success and check labelled answers. It only
    reads (the requests' response formats), so it may run while another chunk is being written."""
    return PreparedChunk(_success_rows(session, prices, batch, outcomes.successes) if outcomes.successes else b"",
                         list(outcomes.successes), outcomes.retryable, outcomes.permanent)


def write_prepared(session: Session, config: AppConfig, batch: ProviderBatch, prepared: PreparedChunk,
                   watch: Collection[uuid.UUID] = ()) -> IngestedChunk:
    """The database half: write one prepared chunk's results in bulk. Lines for tasks no longer in
    this batch are ignored.

    `watch`: task ids the caller wants back if this chunk moved them to `succeeded` (the quality
    monitor's sample, chosen in Python beforehand); a task written by an earlier run of the chunk is
    not returned again."""
    ingested = IngestedChunk()
    if prepared.copy_data:
        ingested = _write_success_rows(session, batch, prepared.copy_data, watch)
    if prepared.retryable:
        return_lines_to_waiting(session, config, batch.id, prepared.retryable)
    if prepared.permanent:
        transitions.fail_batch_lines(session, batch.id, prepared.permanent)
    return ingested


def ingest_outcomes(session: Session, config: AppConfig, prices: PriceBook, batch: ProviderBatch,
                    outcomes: LineOutcomes, watch: Collection[uuid.UUID] = ()) -> IngestedChunk:
    """`prepare_outcomes` then `write_prepared`, in one session."""
    return write_prepared(session, config, batch, prepare_outcomes(session, prices, batch, outcomes), watch)


# no double billing: a task's cost is the sum of its ledger rows, its shadow rows included
_CHARGE_SHADOWED_TASKS = text(
    "UPDATE tasks AS o SET cost_usd = coalesce(o.cost_usd, 0) + v.cost_usd FROM tasks AS s, ingest_rows AS v "
    "WHERE s.id = ANY(CAST(:shadows AS uuid[])) AND v.id = s.id AND o.id = s.shadow_of AND v.cost_usd IS NOT NULL"
)
# a job's tasks share one response format: decode each distinct one once, not once per line
_LABELLED_REQUESTS = text(
    "SELECT (request->'response_format')::text AS response_format, array_agg(id) AS ids FROM tasks "
    "WHERE id = ANY(CAST(:ids AS uuid[])) AND request ? 'response_format' GROUP BY 1"
)


def _success_rows(session: Session, prices: PriceBook, batch: ProviderBatch,
                  successes: dict[uuid.UUID, dict[str, Any]]) -> bytes:
    """The `ingest_rows` COPY data (text format), one row per success: usage, price, and `failed` for a
    labelled answer that is not one of its labels (billed all the same).

    Formatted here, not row by row inside the COPY, so that the writer thread holds the GIL as little
    as possible. A chunk's lines repeat their answers (labels) and their token counts: the label
    check and the pricing are memoized per chunk."""
    ids = list(successes)
    labelled: dict[uuid.UUID, dict[str, Any]] = {}
    for group in session.execute(_LABELLED_REQUESTS, {"ids": ids}):
        request = {"response_format": orjson.loads(group.response_format)}
        labelled.update(dict.fromkeys(group.ids, request))
    problems: dict[tuple[int, str], str | None] = {}
    priced_memo: dict[tuple[str, TokenUsage], str] = {}
    lines: list[str] = []
    for task_id, body in successes.items():
        usage = usage_from_body(body)
        output = output_from_body(body)
        served = str(body.get("model") or batch.model)
        problem: str | None = None
        labelled_request = labelled.get(task_id)
        if labelled_request is not None:
            key = (id(labelled_request), output)
            if key not in problems:
                problems[key] = label_error(labelled_request, output)
            problem = problems[key]
        money = priced_memo.get((served, usage))
        if money is None:
            priced = prices.price(batch.provider, served, batch.model, usage, batch=True)
            unit = priced.prices if priced else None
            money = priced_memo[(served, usage)] = "\t".join(_copy_field(value) for value in (
                usage.input_tokens, usage.cached_tokens, usage.output_tokens, usage.reasoning_tokens,
                unit.input if unit else None, unit.cached_input if unit else None, unit.output if unit else None,
                priced.input_cost if priced else None, priced.cached_input_cost if priced else None,
                priced.output_cost if priced else None, priced.total if priced else None, prices.baseline(usage)))
        lines.append("\t".join((
            str(task_id), "failed" if problem else "succeeded", _copy_field(problem), _copy_field(served),
            _copy_field(output), _copy_text(orjson.dumps(body).decode()), money)))
    lines.append("")
    return "\n".join(lines).encode()


def _copy_text(value: str) -> str:
    """COPY text format: backslash, newline, carriage return and tab escaped (`str.replace` scans are
    several times faster than `str.translate` with a table)."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _copy_field(value: object) -> str:
    if value is None:
        return "\\N"  # NULL
    return _copy_text(value) if isinstance(value, str) else str(value)


def _write_success_rows(session: Session, batch: ProviderBatch, copy_data: bytes,
                        watch: Collection[uuid.UUID] = ()) -> IngestedChunk:
    """COPY the chunk's results into a temp table, then one guarded UPDATE … RETURNING feeding the
    ledger INSERT: lines of tasks no longer in this batch move nothing and bill nothing."""
    connection = session.connection()
    # the statement's estimated cost crosses `jit_above_cost` as `tasks` grows (or when the temp
    # table's statistics lag), and compiling it costs more than running it
    connection.execute(text("SET LOCAL jit = off"))
    connection.execute(text(CREATE_INGEST_TABLE))
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor:
        with cursor.copy(COPY_INGEST_ROWS) as copy:
            copy.write(copy_data)
        # statistics of the join column only (row count and id): the plan needs no more, and a full
        # ANALYZE of the wide rows cost ~5% of the chunk
        cursor.execute("ANALYZE ingest_rows (id)")
    applied = transitions.apply_ingested_rows(connection, batch.id, batch.provider, batch.model, watch)
    if applied.shadows:
        connection.execute(_CHARGE_SHADOWED_TASKS, {"shadows": list(applied.shadows)})
    connection.execute(text("TRUNCATE ingest_rows"))  # the session may go on to another chunk
    succeeded = [SucceededTask(uuid.UUID(task_id), uuid.UUID(tenant_id), task_type, Tier(tier))
                 for task_id, tenant_id, task_type, tier in applied.succeeded or ()]
    return IngestedChunk(int(applied.written), succeeded)


def return_lines_to_waiting(session: Session, config: AppConfig, batch_id: uuid.UUID,
                            errors: dict[uuid.UUID, str]) -> None:
    """Failed, expired, cancelled or missing lines: back to `waiting_batch` for another batch, or
    `failed` once the task has used `max_attempts` batches."""
    transitions.return_lines_to_waiting(session, batch_id, errors, config.batch.max_attempts)


def tasks_left_in_batch(session: Session, batch_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(Task.id).where(Task.batch_id == batch_id,
                                                      Task.status == TaskStatus.IN_BATCH)))


def finish_batch(session: Session, batch_id: uuid.UUID, status: BatchStatus = BatchStatus.DONE,
                 error: str | None = None) -> bool:
    values: dict[str, Any] = {"status": status, "finished_at": func.now(), "updated_at": func.now()}
    if error is not None:
        values["error"] = error
    moved = session.execute(
        update(ProviderBatch).where(ProviderBatch.id == batch_id,
                                    ProviderBatch.status.in_((BatchStatus.INGESTING, BatchStatus.PREPARING)))
        .values(**values).returning(ProviderBatch.id)
    ).first()
    return moved is not None


def touch_batch(session: Session, batch_id: uuid.UUID) -> None:
    session.execute(update(ProviderBatch).where(ProviderBatch.id == batch_id).values(updated_at=func.now()))


# --- whole-batch failures ----------------------------------------------------------------------------


def split_failed_batch(session: Session, config: AppConfig, batch: ProviderBatch, reason: str) -> list[uuid.UUID]:
    """A batch the provider refused as a whole (validation, enqueued-token limit): its tasks go into
    two new batches (halves), submitted after a pause. The claim's attempt covers the whole chain of
    halvings, which ends at a single line; a single line refused on its own fails with the reason."""
    task_ids = sorted(tasks_left_in_batch(session, batch.id))
    new_batches: list[uuid.UUID] = []
    if len(task_ids) == 1:
        transitions.fail_batch_lines(session, batch.id, {task_ids[0]: f"provider refused the batch: {reason}"})
    elif task_ids:
        middle = len(task_ids) // 2
        for half in (task_ids[:middle], task_ids[middle:]):
            new_id = uuid.uuid4()
            session.add(ProviderBatch(
                id=new_id, provider=batch.provider, model=batch.model, status=BatchStatus.PREPARING,
                request_count=len(half), byte_size=0, attempts=0,
                not_before=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, config.batch.failed_batch_retry_seconds),
            ))
            session.flush()
            session.execute(update(Task).where(Task.id.in_(half), Task.batch_id == batch.id,
                                               Task.status == TaskStatus.IN_BATCH)
                            .values(batch_id=new_id, updated_at=func.now()),
                            execution_options={"synchronize_session": False})
            new_batches.append(new_id)
    finish_batch(session, batch.id, BatchStatus.FAILED, error=f"provider refused the batch: {reason}")
    return new_batches


# --- reconciliation and deadlines ----------------------------------------------------------------------


def batches_in(session: Session, status: BatchStatus, *, stale_seconds: float | None = None,
               due_only: bool = False, limit: int = 100) -> list[uuid.UUID]:
    query = select(ProviderBatch.id).where(ProviderBatch.status == status)
    if stale_seconds is not None:
        query = query.where(ProviderBatch.updated_at
                            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, stale_seconds))
    if due_only:
        query = query.where((ProviderBatch.not_before.is_(None)) | (ProviderBatch.not_before <= func.now()))
    return list(session.scalars(query.order_by(ProviderBatch.created_at).limit(limit)))


def tasks_to_escalate(session: Session, config: AppConfig, limit: int = 1000) -> list[uuid.UUID]:
    """Tasks whose deadline the batch path can no longer meet.

    Waiting: the group may wait up to `max_wait_seconds` more, then the provider's turnaround.
    In a batch: the result is not back and the deadline is within `escalate_before_deadline_seconds`.
    """
    limits = config.batch
    return list(session.scalars(text(
        "SELECT id FROM tasks WHERE deadline IS NOT NULL AND ("
        " (status = 'waiting_batch' AND deadline < now() + make_interval(secs => :turnaround) "
        "   + greatest(make_interval(secs => :max_wait) - (now() - created_at), interval '0'))"
        " OR (status = 'in_batch' AND deadline < now() + make_interval(secs => :margin))"
        ") ORDER BY deadline LIMIT :limit"
    ), {"turnaround": limits.expected_turnaround_seconds, "max_wait": limits.max_wait_seconds,
        "margin": limits.escalate_before_deadline_seconds, "limit": limit}))


def as_uuid_list(values: Sequence[str]) -> list[uuid.UUID]:
    return [uuid.UUID(v) for v in values]


def created_epoch(batch: ProviderBatch) -> int:
    created: datetime = batch.created_at
    return int(created.timestamp())
