"""Recording gateway calls: each call is a task with its ledger row, written in one transaction.

Bookkeeping goes through `Recorder`, a group commit: concurrent calls are written together in one
transaction (one multi-row INSERT per table, `CallWriter`), and each caller waits for the commit of its
own row before it answers. What a provider answers is recorded as Postgres can store it, so no answer is
lost to an unstorable character.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from tierbatch.base import inputs
from tierbatch.base.errors import RecordingFailed
from tierbatch.base.states import Mode, TaskStatus
from tierbatch.db.bulk_sql import GATEWAY_WRITE, GATEWAY_WRITE_POSITIONAL
from tierbatch.db.prepared import PreparedStatement
from tierbatch.gateway.routing import Route
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.ledger.rows import usage_columns
from tierbatch.metrics.record import FinishedTasks, charge, count_billed, count_finished

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One gateway call: its task row, and its ledger row when a provider answered."""

    task_id: uuid.UUID
    tenant_id: uuid.UUID
    route: Route
    request: dict[str, Any]
    metadata: dict[str, str]
    status: TaskStatus  # succeeded | failed: the gateway stores finished calls only
    attempts: int
    created_at: datetime
    started_at: datetime
    provider: str | None = None
    requested_model: str | None = None
    served_model: str | None = None
    output: str | None = None
    response_json: str | None = None
    usage: TokenUsage | None = None
    usage_estimated: bool = False
    latency_ms: int | None = None
    error: str | None = None
    prices: Any = None  # PricedUsage | None
    cost_usd: Decimal | None = None
    baseline_cost_usd: Decimal | None = None
    mode: Mode = Mode.IMMEDIATE  # or `cache`: answered from the response cache


def call_costs(prices: PriceBook, provider: str, served: str, requested: str, usage: TokenUsage
               ) -> tuple[Any, Decimal | None, Decimal | None]:
    """A call's priced usage, cost (None: unpriced) and baseline cost, as its record holds them."""
    priced = prices.price(provider, served, requested, usage)
    return priced, (priced.total if priced is not None else None), prices.baseline(usage)


def compact_json(value: Any) -> str:
    """JSON without spaces, characters as they are (not `\\u` escapes): the rows' and the stream's text."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_value(value: Any) -> str:
    """UUIDs, decimals and timestamps as Postgres reads them back from text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


_stdlib_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"), default=_json_value)


def _dumps(value: Any) -> str:
    """orjson (a few times faster than the standard library); the standard library for what orjson refuses
    (an unpaired surrogate, an integer over 64 bits), whose escapes `record_params` then deals with."""
    try:
        return orjson.dumps(value, default=_json_value).decode()
    except TypeError:  # orjson.JSONEncodeError included
        return _stdlib_dumps(value)


# Escapes Postgres cannot take in the rows' JSON text: a NUL (`\u0000`: escaped once in our values, twice
# in the provider's raw JSON) and a surrogate (in the provider's JSON; an escaped *pair* matches too, and
# only costs the slow path).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _storable_param(text: str) -> bool:
    """Whether Postgres takes this JSON text (substring searches and an encode: a regex alternation over
    the whole text would cost more than building it)."""
    if "\\u" in text and _UNSTORABLE_ESCAPE.search(text) is not None:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")  # fails on an unpaired surrogate, raw in our own values
    except UnicodeEncodeError:
        return False
    return True


def _storable_json(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return compact_json(inputs.storable(json.loads(text)))
    except (ValueError, RecursionError):
        return None


def _storable_record(r: CallRecord) -> CallRecord:
    """The record as Postgres can store it: what the provider answered with NUL characters or unpaired
    surrogates replaced (requests holding them are refused before any call)."""
    def text(value: str | None) -> str | None:
        return inputs.storable_text(value) if value is not None else None

    return dataclasses.replace(
        r, request=inputs.storable(r.request), metadata=inputs.storable(r.metadata),
        output=text(r.output), response_json=_storable_json(r.response_json), error=text(r.error),
        served_model=text(r.served_model), requested_model=text(r.requested_model),
        route=dataclasses.replace(r.route, reason=inputs.storable_text(r.route.reason),
                                  task_type=inputs.storable_text(r.route.task_type)))


def record_params(records: Sequence[CallRecord]) -> dict[str, str]:
    """The statement's two parameters: the task rows and the ledger rows, each a JSON array of objects.

    Always storable: a provider's answer holding characters Postgres refuses is stored with them
    replaced, so its task and ledger row are written all the same."""
    params = _record_params(records)
    if _storable_param(params["tasks"]) and _storable_param(params["ledger"]):
        return params
    return _record_params([_storable_record(r) for r in records])


def _record_params(records: Sequence[CallRecord]) -> dict[str, str]:
    tasks: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for r in records:
        usage = r.usage
        tasks.append({
            "id": r.task_id, "tenant_id": r.tenant_id, "task_type": r.route.task_type,
            "requested_tier": r.route.requested_tier.value, "tier": r.route.tier.value,
            "tier_reason": r.route.reason, "request": r.request, "metadata": r.metadata,
            "status": r.status, "provider": r.provider, "model": r.requested_model, "served_model": r.served_model,
            "output": r.output, "response": r.response_json,
            "input_tokens": usage.input_tokens if usage else None,
            "cached_tokens": usage.cached_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "reasoning_tokens": usage.reasoning_tokens if usage else None,
            "cost_usd": r.cost_usd, "baseline_cost_usd": r.baseline_cost_usd, "attempts": r.attempts,
            "error": r.error, "created_at": r.created_at, "started_at": r.started_at, "mode": r.mode.value,
        })
        if usage is None or r.provider is None:
            continue
        ledger.append({
            "tenant_id": r.tenant_id, "task_id": r.task_id, "task_type": r.route.task_type,
            "tier": r.route.tier.value, "provider": r.provider, "requested_model": r.requested_model,
            "served_model": r.served_model, **usage_columns(usage, r.prices),
            "cost_usd": r.cost_usd, "baseline_cost_usd": r.baseline_cost_usd, "unpriced": r.cost_usd is None,
            "latency_ms": r.latency_ms, "usage_estimated": r.usage_estimated, "mode": r.mode.value,
        })
    return {"tasks": _dumps(tasks), "ledger": _dumps(ledger)}


# prepared on the writer's connection and sent over its libpq handle: half the CPU of `execute`
_PREPARED_WRITE = PreparedStatement("tierbatch_gateway_write", GATEWAY_WRITE_POSITIONAL)


class CallWriter:
    """Writes call records on the event loop, over one dedicated autocommit connection (opened on first
    use, reopened after an error): a group of records is one statement, one round trip, one transaction.
    The statement is prepared once per connection (`tierbatch.db.prepared`).

    With `durable=False` (the default) the connection uses `synchronous_commit = off`: the commit does
    not wait for the WAL flush (the disk's fsync, most of a write's latency). A commit is still atomic and
    ordered; only a crash of Postgres itself (not a clean restart, not a crash of the API) can lose the
    last fraction of a second of records. `durable=True` waits for the flush, like every other write.

    With `pgbouncer=True` (a PgBouncer in transaction pooling mode, `[database] pgbouncer`) a session's SET
    would stay on whichever server connection ran it, for other clients: `synchronous_commit = off` is set
    inside each write's own transaction instead (three more round trips), and no statement is prepared
    (`execute` sends it whole each time).
    """

    def __init__(self, dsn: str, *, durable: bool = False, pgbouncer: bool = False) -> None:
        self._dsn = dsn
        self._durable = durable
        self._pgbouncer = pgbouncer
        self._connection: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._pgbouncer:
            return await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, prepare_threshold=None)
        connection = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        try:
            if not self._durable:
                await connection.execute("SET synchronous_commit = off")
            await _PREPARED_WRITE.prepare(connection)
        except BaseException:
            await connection.close()  # not yet the writer's: `aclose` would not see it
            raise
        return connection

    async def _execute(self, connection: psycopg.AsyncConnection[Any], records: Sequence[CallRecord]) -> None:
        if not self._pgbouncer:
            params = record_params(records)
            await _PREPARED_WRITE.run(connection, (params["tasks"], params["ledger"]))
        elif self._durable:
            await connection.execute(GATEWAY_WRITE, record_params(records))
        else:
            async with connection.transaction():
                await connection.execute("SET LOCAL synchronous_commit = off")
                await connection.execute(GATEWAY_WRITE, record_params(records))

    async def write(self, records: Sequence[CallRecord]) -> None:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = await self._connect()
            await self._execute(self._connection, records)  # committed: the connection is in autocommit
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


def count_recorded(records: Sequence[CallRecord]) -> None:
    """The metrics of committed call records: finished tasks, and the money of their ledger rows."""
    count_finished(FinishedTasks(r.status, r.route.tier, r.mode) for r in records)
    count_billed(charge(r.tenant_id, r.mode, r.cost_usd, r.baseline_cost_usd) for r in records
                 if r.usage is not None and r.provider is not None)


# writes the records' rows and returns once they are committed, or raises
WriteRecords = Callable[[Sequence[CallRecord]], Awaitable[None]]
# told of the records whose rows committed (on the event loop, once their callers have gone on to answer)
CommittedRecords = Callable[[Sequence[CallRecord]], None]


class Recorder:
    """Group commit for call records: whoever is waiting when a write starts goes in the next one.

    One writer at a time per process; a caller's `record` returns once its rows are committed, and
    raises `RecordingFailed` when they were not (whatever the writer's error, also when the writer
    itself is cancelled). A group that fails is retried record by record, so one bad row cannot sink
    the others. The metrics of committed records are counted, and `committed` told, in a callback that
    runs after the callers: the bookkeeping does not hold an answer back (the metrics alone were ~2% of
    a sequential call's time).
    """

    def __init__(self, write: WriteRecords, max_group: int = 500, committed: CommittedRecords | None = None) -> None:
        self._write = write
        self._max_group = max_group
        self._committed = committed
        self._pending: list[tuple[CallRecord, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, record: CallRecord) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # not shielded: a caller cancelled meanwhile cancels only its future (the writer skips a settled
        # one), never the writer, and its record is written all the same
        await future

    async def _drain(self) -> None:
        group: list[tuple[CallRecord, asyncio.Future[None]]] = []
        try:
            while self._pending:
                group, self._pending = self._pending[:self._max_group], self._pending[self._max_group:]
                try:
                    await self._write([r for r, _ in group])
                except Exception as exc:
                    if len(group) == 1:
                        log.exception("could not record gateway call %s", group[0][0].task_id)
                        _settle(group[0][1], RecordingFailed(f"the call could not be recorded: {exc}"))
                        continue
                    for record, future in group:
                        try:
                            await self._write([record])
                        except Exception as single:
                            log.exception("could not record gateway call %s", record.task_id)
                            _settle(future, RecordingFailed(f"the call could not be recorded: {single}"))
                        else:
                            self._settle_committed([(record, future)])
                else:
                    self._settle_committed(group)
        finally:
            # a writer stopped midway (cancelled, or an error of its own) leaves no caller waiting, and none
            # answering as if its rows were written
            left, self._pending = group + self._pending, []
            for _, future in left:
                _settle(future, RecordingFailed("the recorder stopped before the call was recorded"))

    def _settle_committed(self, group: Sequence[tuple[CallRecord, asyncio.Future[None]]]) -> None:
        for _, future in group:
            _settle(future, None)
        # queued behind the callers' wake-ups: each caller answers before this runs
        asyncio.get_running_loop().call_soon(self._count_and_tell, [r for r, _ in group])

    def _count_and_tell(self, records: Sequence[CallRecord]) -> None:
        try:
            count_recorded(records)
            if self._committed is not None:
                self._committed(records)
        except Exception:  # what listens to commits must not turn a recorded call into a failed one
            log.exception("the bookkeeping of %d committed call records failed", len(records))

    async def aclose(self) -> None:
        if self._writer is not None:
            # the writer's last bookkeeping was queued before its end: it runs before this returns
            await asyncio.shield(self._writer)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
