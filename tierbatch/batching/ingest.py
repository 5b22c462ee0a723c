"""Ingestion: a provider batch's output and error lines, sorted into what happens to each task
(`classify_lines`), priced and checked in Python (`prepare_outcomes`), then written in bulk
(`write_prepared`: COPY into a temp table, one guarded UPDATE feeding the ledger).

Each function takes a session and never commits; the worker owns the transactions. Guards on
`status` and `batch_id` make every step safe to run twice.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import TextClause, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig, CacheConfig, QualityConfig
from tierbatch.base.states import Mode, Tier
from tierbatch.cache.responses import maybe_cacheable
from tierbatch.db.bulk_sql import COPY_INGEST_ROWS, CREATE_INGEST_TABLE
from tierbatch.db.models import ProviderBatch
from tierbatch.db.partitions import months_spanned, plan_for_the_values
from tierbatch.ledger.pricing import PriceBook
from tierbatch.ledger.rows import usage_columns
from tierbatch.metrics.catalog import LINES_INGESTED
from tierbatch.metrics.commit import after_commit
from tierbatch.metrics.record import Billed, FinishedTasks, billed, tasks_finished
from tierbatch.providers.adapter import output_from_body, usage_from_body
from tierbatch.providers.error_mapping import RETRYABLE_STATUS
from tierbatch.tasks import transitions
from tierbatch.tasks.labels import label_error
from tierbatch.tasks.sample_points import MAY_BE_SAMPLED_SQL, rate_params, samples_any


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


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while chunks are parsed, formatted and written: parsed JSON holds
    no reference cycles, yet the tens of thousands of containers a chunk allocates trigger collections
    that walk the whole heap (about a fifth of the parse and format time in a worker). Best held over a
    whole batch (`tierbatch.worker.batch`): turned back on while a chunk's parsed bodies are still alive,
    its first collection walks all of them (a seventh of the reading thread's time when each step paused
    on its own); once the chunks are written and freed, there is little left to walk."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def classify_lines(lines: Iterable[str | bytes]) -> LineOutcomes:
    with collector_paused():
        return _classify_lines(lines)


def _classify_lines(lines: Iterable[str | bytes]) -> LineOutcomes:
    outcomes = LineOutcomes()
    successes = outcomes.successes
    loads, to_uuid = orjson.loads, uuid.UUID
    for raw in lines:
        try:
            line = loads(raw)
            custom_id = line["custom_id"]
            task_id = to_uuid(custom_id if custom_id.__class__ is str else str(custom_id))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not one of ours: nothing to join it with
        response = line.get("response")
        if response.__class__ is dict and response.get("status_code") == 200:
            body = response.get("body")
            successes[task_id] = body if body.__class__ is dict else {}
        elif isinstance(response, dict):
            status = _status_code(response.get("status_code"))
            message = f"batch line HTTP {status}: " + _error_message(response.get("body"), "no message")
            target = outcomes.retryable if status in RETRYABLE_STATUS or status >= 500 else outcomes.permanent
            target[task_id] = message
        else:
            error = line.get("error") or {}
            # non-HTTP line errors (expired, cancelled, internal) are worth another batch
            outcomes.retryable[task_id] = "batch line error: " + _error_message({"error": error}, "unknown")
    return outcomes


def _status_code(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


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
    # the successes the quality monitor may sample (`prepare_outcomes` with its rates), for `write_prepared`
    watch: list[uuid.UUID] = field(default_factory=list)
    # the successes whose answers the response cache may keep (`prepare_outcomes` with its config)
    cacheable: list[uuid.UUID] = field(default_factory=list)


def prepare_outcomes(session: Session, prices: PriceBook, batch: ProviderBatch, outcomes: LineOutcomes,
                     quality: QualityConfig | None = None, cache: CacheConfig | None = None) -> PreparedChunk:
    """The Python half of ingesting a chunk: price each success and check labelled answers. It only
    reads (the requests' response formats), so it may run while another chunk is being written. In the
    same statement, with `quality`, the successes the quality monitor may sample (`watch`), and with
    `cache`, those the response cache may keep (`cacheable`)."""
    prepared = PreparedChunk(success_ids=list(outcomes.successes), retryable=outcomes.retryable,
                             permanent=outcomes.permanent)
    if outcomes.successes:
        with collector_paused():
            prepared.copy_data, prepared.watch, prepared.cacheable = _success_rows(
                session, prices, batch, outcomes.successes,
                quality if quality is not None and samples_any(quality) else None, cache)
    return prepared


def write_prepared(session: Session, config: AppConfig, batch: ProviderBatch, prepared: PreparedChunk,
                   watch: Collection[uuid.UUID] = ()) -> IngestedChunk:
    """The database half: write one prepared chunk's results in bulk. Lines for tasks no longer in
    this batch are ignored.

    `watch`: task ids the caller wants back if this chunk moved them to `succeeded` (the quality
    monitor's sample, chosen in Python beforehand); a task written by an earlier run of the chunk is
    not returned again."""
    ingested = IngestedChunk()
    retried = failed = 0
    if prepared.copy_data:
        ingested = _write_success_rows(session, batch, prepared.copy_data, prepared.success_ids, watch)
    if prepared.retryable:
        retried = transitions.return_lines_to_waiting(session, batch.id, prepared.retryable,
                                                      config.batch.max_attempts)
    if prepared.permanent:
        failed = transitions.fail_batch_lines(session, batch.id, prepared.permanent)
    lines = {"written": ingested.written, "retried": retried, "failed": failed}
    after_commit(session, lambda: _count_lines(batch.provider, batch.model, lines))
    return ingested


def _count_lines(provider: str, model: str, lines: dict[str, int]) -> None:
    for outcome, count in lines.items():
        if count:
            LINES_INGESTED.labels(provider, model, outcome).inc(count)


def ingest_outcomes(session: Session, config: AppConfig, prices: PriceBook, batch: ProviderBatch,
                    outcomes: LineOutcomes, watch: Collection[uuid.UUID] = ()) -> IngestedChunk:
    """`prepare_outcomes` then `write_prepared`, in one session."""
    return write_prepared(session, config, batch, prepare_outcomes(session, prices, batch, outcomes), watch)


# no double billing: a task's cost is the sum of its ledger rows, its shadow rows included
_CHARGE_SHADOWED_TASKS = text(
    "UPDATE tasks AS o SET cost_usd = coalesce(o.cost_usd, 0) + v.cost_usd FROM tasks AS s, ingest_rows AS v "
    "WHERE s.id = ANY(CAST(:shadows AS uuid[])) AND v.id = s.id AND o.id = s.shadow_of AND v.cost_usd IS NOT NULL"
)

def _chunk_requests(watch: bool, cacheable: str | None) -> TextClause:
    """What a chunk's requests say, in one visit of its rows: its distinct response formats with their
    tasks (a job's tasks share one: each is decoded once, not once per line), with `watch` the quality
    monitor's candidates among them, and with `cacheable` (SQL over `tasks`) the tasks whose answers the
    response cache may keep. The ids go both ways as text (one array literal out, text back), which costs
    far less than adapting 10,000 UUIDs.

    The inner query hands the aggregate narrow rows: left to itself the planner sorted the whole rows,
    requests included, for the grouping, and spilled them to disk (twice the statement's time). The ids
    reach it through a sub-select, which hides the 10,000 values from the planner: given them, it
    estimated each one against the statistics (a third of the statement). The months' range prunes the
    partitions (`months_spanned`: an array this long prunes none)."""
    watched = MAY_BE_SAMPLED_SQL if watch else "false"
    kept = f"({cacheable})" if cacheable else "false"
    return text(
        "SELECT response_format, array_agg(id) FILTER (WHERE labelled) AS ids,"
        " array_agg(id) FILTER (WHERE watched) AS watch, array_agg(id) FILTER (WHERE cacheable) AS cacheable "
        "FROM (SELECT (request->'response_format')::text AS response_format,"
        f" request ? 'response_format' AS labelled, id::text AS id, {watched} AS watched, {kept} AS cacheable"
        " FROM tasks WHERE id = ANY(CAST((SELECT CAST(:ids AS uuid[])) AS uuid[]))"
        " AND id >= :months_from AND id < :months_to"
        " OFFSET 0) AS chunk GROUP BY 1")


def _cacheable_sql(cache: CacheConfig | None) -> str | None:
    """The response cache's prefilter (`maybe_cacheable`) as SQL text over `tasks`, its values inlined."""
    if cache is None or not cache.enabled:
        return None
    return str(maybe_cacheable(cache).compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def _success_rows(session: Session, prices: PriceBook, batch: ProviderBatch,
                  successes: dict[uuid.UUID, dict[str, Any]], quality: QualityConfig | None,
                  cache: CacheConfig | None = None) -> tuple[bytes, list[uuid.UUID], list[uuid.UUID]]:
    """The `ingest_rows` COPY data (text format), one row per success: usage, price, and `failed` for a
    labelled answer that is not one of its labels (billed all the same).

    Formatted here, not row by row inside the COPY, so that the writer thread holds the GIL as little
    as possible. A chunk's lines repeat their answers (labels) and their token counts: the label
    check is memoized per chunk, and the usage and price columns per (served model, usage object as
    the provider wrote it), so a repeated usage is neither normalised nor priced again. Also, with
    `quality`, the successes the quality monitor may sample, and with `cache`, those the response cache
    may keep."""
    texts = [str(task_id) for task_id in successes]  # once: the label lookup and the COPY rows use them
    labelled: dict[str, dict[str, Any]] = {}
    watch: list[uuid.UUID] = []
    cacheable: list[uuid.UUID] = []
    params: dict[str, Any] = {"ids": "{" + ",".join(texts) + "}", **months_spanned(successes)}
    if quality is not None:
        params.update(rate_params(quality))
    plan_for_the_values(session)
    for group in session.execute(_chunk_requests(quality is not None, _cacheable_sql(cache)), params):
        if group.watch:
            watch.extend(uuid.UUID(task_id) for task_id in group.watch)
        if group.cacheable:
            cacheable.extend(uuid.UUID(task_id) for task_id in group.cacheable)
        if group.ids:
            request = {"response_format": orjson.loads(group.response_format)}
            labelled.update(dict.fromkeys(group.ids, request))
    problems: dict[tuple[int, str], str | None] = {}
    money_memo: dict[tuple[str, bytes], str] = {}
    dumps = orjson.dumps
    default_model = batch.model
    lines: list[str] = []
    append = lines.append
    for text_id, body in zip(texts, successes.values(), strict=True):
        output = _output(body)
        served = body.get("model") or default_model
        if served.__class__ is not str:
            served = str(served)
        problem: str | None = None
        labelled_request = labelled.get(text_id)
        if labelled_request is not None:
            key = (id(labelled_request), output)
            if key not in problems:
                problems[key] = label_error(labelled_request, output)
            problem = problems[key]
        raw_usage = body.get("usage")
        money_key = (served, dumps(raw_usage) if raw_usage else b"")
        money = money_memo.get(money_key)
        if money is None:
            usage = usage_from_body(body)
            priced = prices.price(batch.provider, served, batch.model, usage, batch=True)
            money = money_memo[money_key] = "\t".join(_copy_field(value) for value in (
                *usage_columns(usage, priced).values(), priced.total if priced else None, prices.baseline(usage)))
        # JSON text holds no raw tab, newline or carriage return (they are escaped in strings):
        # only its backslashes need COPY's escaping
        response = dumps(body).decode()
        if "\\" in response:
            response = response.replace("\\", "\\\\")
        append("\t".join((
            text_id, "failed" if problem else "succeeded", _copy_field(problem), _copy_text(served),
            _copy_text(output) if output else "", response, money)))
    append("")
    return "\n".join(lines).encode(), watch, cacheable


def _output(body: dict[str, Any]) -> str:
    """`output_from_body`, with a direct path for the common shape."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return output_from_body(body)
    return content if content.__class__ is str else output_from_body(body)


def _copy_text(value: str) -> str:
    """COPY text format: backslash, newline, carriage return and tab escaped (`str.replace` scans are
    several times faster than `str.translate` with a table)."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\n" in value:
        value = value.replace("\n", "\\n")
    if "\r" in value:
        value = value.replace("\r", "\\r")
    if "\t" in value:
        value = value.replace("\t", "\\t")
    return value


def _copy_field(value: object) -> str:
    if value is None:
        return "\\N"  # NULL
    return _copy_text(value) if isinstance(value, str) else str(value)


def _write_success_rows(session: Session, batch: ProviderBatch, copy_data: bytes, ids: Collection[uuid.UUID],
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
    applied = transitions.apply_ingested_rows(connection, batch.id, batch.provider, batch.model, ids, watch)
    if applied.shadows:
        connection.execute(_CHARGE_SHADOWED_TASKS, {"shadows": list(applied.shadows)})
    connection.execute(text("TRUNCATE ingest_rows"))  # the session may go on to another chunk
    tasks_finished(session, *(FinishedTasks(status, tier, Mode.BATCH, int(count))
                              for status, tier, count in applied.finished or ()))
    billed(session, *(Billed(tenant, Mode.SHADOW if shadow else Mode.BATCH, Decimal(cost), Decimal(baseline),
                             int(unpriced)) for tenant, shadow, cost, baseline, unpriced in applied.billed or ()))
    succeeded = [SucceededTask(uuid.UUID(task_id), uuid.UUID(tenant_id), task_type, Tier(tier))
                 for task_id, tenant_id, task_type, tier in applied.succeeded or ()]
    return IngestedChunk(int(applied.written), succeeded)


def return_lines_to_waiting(session: Session, config: AppConfig, batch_id: uuid.UUID,
                            errors: dict[uuid.UUID, str]) -> None:
    """Failed, expired, cancelled or missing lines: back to `waiting_batch` for another batch, or
    `failed` once the task has used `max_attempts` batches."""
    transitions.return_lines_to_waiting(session, batch_id, errors, config.batch.max_attempts)
