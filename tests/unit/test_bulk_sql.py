"""The hand-written bulk statements agree with the models: column names, temp-table types, and the rows
the Python side builds for them."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Enum, LargeBinary, MetaData, Table

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.ids import new_task_ids
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.db import bulk_sql
from tierbatch.db.bulk_sql import LEDGER, TASKS, columns, sql_type
from tierbatch.gateway.recorder import CallRecord, record_params
from tierbatch.gateway.routing import Route
from tierbatch.jobs.requests import JobItem, JobSettings
from tierbatch.jobs.rows import task_rows
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.tasks import transitions as task_transitions

CONFIG = parse_config(default_config_data())
TABLES = {"tasks": TASKS, "ledger_entries": LEDGER}
STATEMENTS = {
    "COPY_TASKS": bulk_sql.COPY_TASKS,
    "CREATE_INGEST_TABLE": bulk_sql.CREATE_INGEST_TABLE,
    "COPY_INGEST_ROWS": bulk_sql.COPY_INGEST_ROWS,
    "APPLY_INGEST_ROWS": str(task_transitions.APPLY_INGEST_ROWS),
    "QUEUE_SHADOW_TASKS": str(bulk_sql.QUEUE_SHADOW_TASKS),
    "GATEWAY_WRITE": bulk_sql.GATEWAY_WRITE,
}
_TARGET = re.compile(r"(?:INSERT INTO|COPY) (\w+) \(([^)]*)\)")


def _targets(statement: str) -> list[tuple[str, list[str]]]:
    return [(table, [name.strip() for name in names.split(",")]) for table, names in _TARGET.findall(statement)]


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_every_written_column_is_a_model_column(name: str) -> None:
    targets = _targets(STATEMENTS[name])
    assert targets or name == "CREATE_INGEST_TABLE"
    for table, names in targets:
        known = set(bulk_sql.INGEST_COLUMNS) if table == "ingest_rows" else set(TABLES[table].c.keys())
        assert set(names) <= known, (name, table, set(names) - known)
        assert len(set(names)) == len(names), (name, table)


def test_the_temp_table_mirrors_the_model_columns() -> None:
    declared = re.search(r"ingest_rows \((.*)\) ON COMMIT", bulk_sql.CREATE_INGEST_TABLE)
    assert declared is not None
    pairs = [part.split()[:2] for part in declared.group(1).split(", ")]
    assert [name for name, _ in pairs] == list(bulk_sql.INGEST_COLUMNS)
    for name, kind in pairs:
        mirrored = next(table for table in (TASKS, LEDGER) if name in table.c)  # a task's column first
        assert kind == sql_type(mirrored.c[name]), name
    assert dict(pairs)["status"] == TASKS.c.status.type.name  # type: ignore[attr-defined]


def _fits(column: Column[Any], value: Any) -> bool:
    """Whether a COPY row's Python value reads back as the column's type."""
    if value is None:
        return bool(column.nullable)
    kind = sql_type(column)
    if isinstance(column.type, Enum):
        return value in column.type.enums
    checks = {
        "uuid": lambda v: isinstance(v, uuid.UUID) or uuid.UUID(v) is not None,
        "text": lambda v: isinstance(v, str),
        "jsonb": lambda v: isinstance(v, str) and json.loads(v) is not None,
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "timestamptz": lambda v: isinstance(v, datetime) and v.tzinfo is not None,
    }
    return bool(checks[kind](value))


def test_job_rows_follow_the_copy_columns() -> None:
    settings = JobSettings(task_type="classification", labels=("a",), metadata={"team": "x"}, urgent=True)
    ids = new_task_ids(2)
    rows = list(task_rows([JobItem("1", "p", None), JobItem("2", None, [{"role": "user", "content": "q"}])], ids,
                          settings, CONFIG, uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)))
    for row in rows:
        assert len(row) == len(bulk_sql.TASK_COPY_COLUMNS)
        for name, value in zip(bulk_sql.TASK_COPY_COLUMNS, row, strict=True):
            assert _fits(TASKS.c[name], value), (name, value)
    required = {c.name for c in TASKS.c if not c.nullable and c.server_default is None}
    assert required <= set(bulk_sql.TASK_COPY_COLUMNS)  # a COPY gets no ORM defaults


def _record(**changes: Any) -> CallRecord:
    route = Route(Tier.LIGHT, RequestedTier.AUTO, "config routing", "general", [])
    now = datetime.now(UTC)
    record = CallRecord(uuid.uuid4(), uuid.uuid4(), route, {"model": "m"}, {}, TaskStatus.SUCCEEDED, 1, now, now,
                        provider="p", requested_model="m", served_model="m", output="hi", response_json="{}",
                        usage=TokenUsage(1, 0, 1, 0), latency_ms=3, mode=Mode.IMMEDIATE)
    return CallRecord(**{**{f: getattr(record, f) for f in record.__dataclass_fields__}, **changes})


def test_gateway_records_carry_exactly_the_statement_columns() -> None:
    params = record_params([_record()])
    (task,), (ledger,) = json.loads(params["tasks"]), json.loads(params["ledger"])
    assert list(task) == list(bulk_sql.GATEWAY_TASK_COLUMNS)
    assert list(ledger) == list(bulk_sql.GATEWAY_LEDGER_COLUMNS)
    for table, names in _targets(bulk_sql.GATEWAY_WRITE):
        given = bulk_sql.GATEWAY_TASK_COLUMNS if table == "tasks" else bulk_sql.GATEWAY_LEDGER_COLUMNS
        assert names[:len(given)] == list(given)
        required = {c.name for c in TABLES[table].c if not c.nullable and c.server_default is None
                    and c.autoincrement is not True}
        assert required <= set(names), (table, required - set(names))


def test_a_wrong_column_name_is_caught() -> None:
    with pytest.raises(ValueError, match="not columns of tasks: item"):
        columns(TASKS, "id", "item", "request")
    with pytest.raises(ValueError, match="named twice"):
        columns(LEDGER, "task_id", "task_id")
    # the ORM attribute is `task_metadata`; the statements must use the column's name
    with pytest.raises(ValueError, match="task_metadata"):
        columns(TASKS, "task_metadata")


def test_a_type_without_a_spelling_is_caught() -> None:
    table = Table("planted", MetaData(), Column("blob", LargeBinary))
    with pytest.raises(TypeError, match="blob"):
        sql_type(table.c.blob)


def test_bulk_statements_live_in_one_module() -> None:
    """A hand-written column list for these tables anywhere else in the package would escape the checks above
    (a list joined from this module's names, `({', '.join(...)})`, is fine)."""
    package = Path(bulk_sql.__file__).parents[1]
    pattern = re.compile(r"(INSERT INTO|COPY) (tasks|ledger_entries|ingest_rows) \((?!\{)|CREATE TEMP TABLE")
    strays = [f"{path.name}: {match.group(0)}" for path in sorted(package.rglob("*.py")) if path.name != "bulk_sql.py"
              for match in pattern.finditer(path.read_text())]
    assert strays == []
