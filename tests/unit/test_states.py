"""The state sets render to the very SQL the schema and queries were written with: an index predicate
the planner matches, or a CHECK, must not change when it is built from the enums."""

from __future__ import annotations

import pytest
from sqlalchemy import CheckConstraint

from tierbatch.base.states import LIVE_TASK_STATUSES, TERMINAL_TASK_STATUSES, TaskStatus, sql_in
from tierbatch.db.models import Base
from tierbatch.jobs.webhooks import _LIVE_TASK

# as they stood when they were hand-written (and as migrations 0001-0011 created them)
EXPECTED = {
    "ck_tasks_finished_at_iff_terminal": "(status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)",
    "ix_tasks_live": "status IN ('queued', 'running')",
    "ix_tasks_waiting_batch": "status = 'waiting_batch'",
    "ix_tasks_batch_deadline": "deadline IS NOT NULL AND status IN ('waiting_batch', 'in_batch')",
    "ix_tasks_tenant_live": "status IN ('queued', 'waiting_batch', 'in_batch', 'running')",
    "ck_provider_batches_finished_at_iff_terminal": "(status IN ('done', 'failed')) = (finished_at IS NOT NULL)",
    "ix_provider_batches_open": "status NOT IN ('done', 'failed')",
    "ix_client_batches_due": "status IN ('in_progress', 'finalizing')",
    "ck_schedule_runs_finished_at_iff_terminal": "(status IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)",
    "ix_schedule_runs_open": "status = 'running'",
    "ix_schedule_runs_webhook_pending": "webhook_status = 'pending'",
    "ix_jobs_webhook_pending": "webhook_status = 'pending'",
    "uq_classifications_schedule_item": "status <> 'failed'",
}


def _rendered() -> dict[str, str]:
    out: dict[str, str] = {}
    for table in Base.metadata.tables.values():
        for constraint in table.constraints:
            if isinstance(constraint, CheckConstraint):
                out[str(constraint.name)] = str(constraint.sqltext)
        for index in table.indexes:
            where = index.dialect_options["postgresql"]["where"]
            if where is not None:
                out[str(index.name)] = str(where)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_predicates_are_unchanged(name: str) -> None:
    assert _rendered()[name] == EXPECTED[name]


def test_sql_in_renders_an_in_list() -> None:
    assert sql_in(LIVE_TASK_STATUSES) == "('queued', 'waiting_batch', 'in_batch', 'running')"
    assert sql_in(TERMINAL_TASK_STATUSES) == "('succeeded', 'failed', 'cancelled')"
    assert sql_in([TaskStatus.QUEUED]) == "('queued')"
    with pytest.raises(ValueError):
        sql_in([])


def test_live_and_terminal_split_the_task_states() -> None:
    assert set(LIVE_TASK_STATUSES) | set(TERMINAL_TASK_STATUSES) == set(TaskStatus)
    assert not set(LIVE_TASK_STATUSES) & set(TERMINAL_TASK_STATUSES)
    assert all(s.is_terminal for s in TERMINAL_TASK_STATUSES)
    assert str(_LIVE_TASK) == "tasks.status IN ('queued', 'waiting_batch', 'in_batch', 'running')"
