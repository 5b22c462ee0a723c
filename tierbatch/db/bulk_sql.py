"""Hand-written bulk statements (COPY, multi-row INSERT … SELECT, the ingestion temp table), kept beside
the models they write: every column list is checked against the table metadata when the statement is
built, and the temp table's column types come from the columns it mirrors. The ORM cannot express these
in one round trip at their speed; this module keeps them from drifting away from the schema.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Enum,
    Integer,
    Numeric,
    Table,
    Text,
    TextClause,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from tierbatch.db.models import JobItemId, LedgerEntry, Task

TASKS: Table = Task.__table__  # type: ignore[assignment]
LEDGER: Table = LedgerEntry.__table__  # type: ignore[assignment]
JOB_ITEM_IDS: Table = JobItemId.__table__  # type: ignore[assignment]


def columns(table: Table, *names: str) -> tuple[str, ...]:
    """`names`, once each is known to be a column of `table` (a typo fails here, not at the first write)."""
    unknown = [name for name in names if name not in table.c]
    if unknown:
        raise ValueError(f"not columns of {table.name}: {', '.join(unknown)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a column named twice for {table.name}: {', '.join(names)}")
    return names


def sql_type(column: Column[object]) -> str:
    """The column's type as the statements spell it: enums by their Postgres name, numerics unconstrained
    (a temp table or a JSON record only carries the value to the real column, which has the scale)."""
    kind = column.type
    if isinstance(kind, Enum):
        assert kind.name is not None
        return kind.name
    for python_type, name in ((Uuid, "uuid"), (JSONB, "jsonb"), (BigInteger, "bigint"), (Integer, "integer"),
                              (Boolean, "boolean"), (Numeric, "numeric"), (Text, "text")):
        if isinstance(kind, python_type):
            return name
    if isinstance(kind, DateTime):
        return "timestamptz" if kind.timezone else "timestamp"
    raise TypeError(f"{column.table}.{column.name}: no SQL spelling for {kind!r}")


def _copy(table: str, names: Sequence[str]) -> str:
    return f"COPY {table} ({', '.join(names)}) FROM STDIN"


# --- a ledger row's usage: tokens by kind, unit prices, cost per kind, the batch discount applied ----------

# Every path that writes ledger rows writes these, with the values tierbatch.ledger.rows.usage_columns gives.
LEDGER_USAGE_COLUMNS = columns(
    LEDGER, "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "input_price", "cached_input_price", "cache_write_price", "output_price", "input_cost_usd",
    "cached_input_cost_usd", "cache_write_cost_usd", "output_cost_usd", "batch_discount")


# --- job items: one COPY of new `tasks` rows --------------------------------------------------------

# `mode`, `provider`, `model`: set for a task stored straight into `waiting_batch` (its route was known when
# it was written), null for a `queued` one (routing sets them)
TASK_COPY_COLUMNS = columns(TASKS, "id", "item_id", "request", "tier", "tier_reason", "tenant_id", "job_id",
                            "task_type", "requested_tier", "urgent", "deadline", "metadata", "status", "attempts",
                            "dispatched_at", "mode", "provider", "model")
COPY_TASKS = _copy("tasks", TASK_COPY_COLUMNS)
# ... and their item ids, the job's (tierbatch/jobs/store.py)
COPY_JOB_ITEM_IDS = _copy("job_item_ids", columns(JOB_ITEM_IDS, "job_id", "item_id"))


# --- batch ingestion: a chunk's results COPied into a temp table, then one UPDATE … INSERT -------------

# (table, column) of each temp-table column: the task's result columns, and the ledger's usage and price columns
_INGEST_SOURCES: tuple[tuple[Table, str], ...] = (
    *((TASKS, name) for name in ("id", "status", "error", "served_model", "output", "response")),
    *((LEDGER, name) for name in LEDGER_USAGE_COLUMNS),
    (TASKS, "cost_usd"), (TASKS, "baseline_cost_usd"),
)


def _ingest_table() -> tuple[tuple[str, ...], str]:
    names = tuple(name for _, name in _INGEST_SOURCES)
    declared = [f"{name} {sql_type(table.c[name])}" for table, name in _INGEST_SOURCES if columns(table, name)]
    # no primary key: the UPDATE reads the table once, in order, and looks each task up by its own key;
    # building the index cost a fifth of the COPY (a chunk's ids are distinct: they key a dict)
    return names, (f"CREATE TEMP TABLE IF NOT EXISTS ingest_rows ({', '.join(declared)}) ON COMMIT DELETE ROWS")


INGEST_COLUMNS, CREATE_INGEST_TABLE = _ingest_table()
COPY_INGEST_ROWS = _copy("ingest_rows", INGEST_COLUMNS)

# The ledger rows ingestion writes for the tasks it moved (the statement is a task transition:
# tierbatch.tasks.transitions, the one writer of task status, owns it).
INGEST_LEDGER_COLUMNS = columns(
    LEDGER, "tenant_id", "task_id", "job_id", "batch_id", "task_type", "tier", "mode", "provider", "requested_model",
    "served_model", *LEDGER_USAGE_COLUMNS, "cost_usd", "baseline_cost_usd", "unpriced", "usage_estimated")


# --- quality monitor: batch-path shadow tasks, one INSERT … SELECT for a whole pick -----------------

# A shadow's id is derived from its task's (tierbatch.base.ids.shadow_task_id): a second shadow of the same
# task is the same primary key, and does nothing.
_SHADOW_TASK_COLUMNS = columns(TASKS, "id", "tenant_id", "task_type", "requested_tier", "tier", "tier_reason",
                               "urgent", "request", "metadata", "status", "mode", "provider", "model", "attempts",
                               "dispatched_at", "created_at", "updated_at", "shadow_of")
QUEUE_SHADOW_TASKS: TextClause = text(
    f"INSERT INTO tasks ({', '.join(_SHADOW_TASK_COLUMNS)}) "
    "SELECT v.shadow_id, o.tenant_id, o.task_type, CAST(v.tier AS requested_tier), CAST(v.tier AS tier),"
    " 'quality monitor: ' || v.kind || ' of ' || o.id, false, o.request, o.metadata, 'waiting_batch', 'batch',"
    " v.provider, v.model, 0, now(), now(), now(), o.id "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:shadow_ids AS uuid[]), CAST(:tiers AS text[]), CAST(:kinds AS text[]),"
    " CAST(:providers AS text[]), CAST(:models AS text[])) AS v(id, shadow_id, tier, kind, provider, model) "
    "JOIN tasks AS o ON o.id = v.id "
    "ON CONFLICT (id) DO NOTHING"
)


# --- gateway group commit: a group's task and ledger rows in one statement ----------------------------

# The columns of each JSON record the gateway sends (tierbatch.gateway.recorder.record_params builds them by these
# names).
GATEWAY_TASK_COLUMNS = columns(
    TASKS, "id", "tenant_id", "task_type", "requested_tier", "tier", "tier_reason", "request", "metadata", "status",
    "provider", "model", "served_model", "output", "response", "input_tokens", "cached_tokens", "output_tokens",
    "reasoning_tokens", "cost_usd", "baseline_cost_usd", "attempts", "error", "created_at", "started_at", "mode")
GATEWAY_LEDGER_COLUMNS = columns(
    LEDGER, "tenant_id", "task_id", "task_type", "tier", "provider", "requested_model", "served_model",
    *LEDGER_USAGE_COLUMNS, "cost_usd", "baseline_cost_usd", "unpriced", "latency_ms", "usage_estimated", "mode")
# Enums travel as text and the provider's body as its raw JSON text, cast on the way in.
_GATEWAY_AS_TEXT = frozenset({"requested_tier", "tier", "status", "response", "mode"})


def _recordset(param: str, table: Table, names: Sequence[str]) -> str:
    """`SELECT ... FROM json_to_recordset(%(param)s::json) AS v(...)`: any number of rows in one text
    parameter (serialized by the json module in C; arrays of Python values cost far more)."""
    types = {name: sql_type(table.c[name]) for name in names}
    declared = ", ".join(f"{n} {'text' if n in _GATEWAY_AS_TEXT else types[n]}" for n in names)
    selected = ", ".join(f"v.{n}::{types[n]}" if n in _GATEWAY_AS_TEXT else f"v.{n}" for n in names)
    return f"SELECT {selected}{{extra}} FROM json_to_recordset(%({param})s::json) AS v({declared})"


def _gateway_write() -> str:
    """Both tables in ONE statement (a data-modifying CTE): in autocommit, one round trip is the whole
    transaction, and the ledger's foreign key to the task is checked at the end of that statement."""
    extra = columns(TASKS, "urgent", "finished_at", "updated_at")
    tasks = (f"INSERT INTO tasks ({', '.join(GATEWAY_TASK_COLUMNS + extra)}) "
             + _recordset("tasks", TASKS, GATEWAY_TASK_COLUMNS).format(extra=", true, now(), now()"))
    ledger = (f"INSERT INTO ledger_entries ({', '.join(GATEWAY_LEDGER_COLUMNS)}) "
              + _recordset("ledger", LEDGER, GATEWAY_LEDGER_COLUMNS).format(extra=""))
    return f"WITH written_tasks AS ({tasks} RETURNING id) {ledger}"


GATEWAY_WRITE = _gateway_write()
# the same with positional placeholders, for a server-side prepared statement (`tierbatch.db.prepared`):
# $1 the task rows, $2 the ledger rows
GATEWAY_WRITE_POSITIONAL = GATEWAY_WRITE.replace("%(tasks)s", "$1").replace("%(ledger)s", "$2")
