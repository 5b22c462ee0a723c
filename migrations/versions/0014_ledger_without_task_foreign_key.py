"""ledger without the per-row foreign key to its task

Batch ingestion writes a chunk's ledger rows in the statement that moves their tasks, from the rows
that statement updated (`RETURNING`), as the gateway writes a task and its ledger row in one statement;
no path writes a ledger row for a task it did not just read or write, and tasks are never deleted. The
foreign key's per-row check (an index probe of `tasks` and a row lock, WAL-logged, on a row the same
statement has just rewritten) was about a sixth of the ingestion statement against a million-task
table, as the three dropped in 0005 were. The unique index on `task_id` (no double billing) stays.

Downgrade adds the key back, validated against the rows already written.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASK_KEY = 'fk_ledger_entries_task_id_tasks'


def upgrade() -> None:
    op.drop_constraint(op.f(TASK_KEY), 'ledger_entries', type_='foreignkey')


def downgrade() -> None:
    op.create_foreign_key(op.f(TASK_KEY), 'ledger_entries', 'tasks', ['task_id'], ['id'])
