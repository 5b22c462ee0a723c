"""idempotency keys: a partial unique index (only tasks that have a key)

Most tasks carry no idempotency key, yet the full unique constraint took an index entry for every row
written, and every non-HOT update of a task (each batch result, each status change that rewrites the
row) wrote one more. The partial index holds only the keys; `insert_tasks` names its predicate in
`ON CONFLICT`. Uniqueness of (tenant, key) is unchanged: NULL keys never conflicted.

The ACCESS EXCLUSIVE lock of the DROP is held until the CREATE commits, so no task is written between
the two.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 04:31:39.506735
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint('uq_tasks_tenant_idempotency_key', 'tasks', type_='unique')
    op.create_index('uq_tasks_tenant_idempotency_key', 'tasks', ['tenant_id', 'idempotency_key'], unique=True,
                    postgresql_where=sa.text('idempotency_key IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('uq_tasks_tenant_idempotency_key', table_name='tasks',
                  postgresql_where=sa.text('idempotency_key IS NOT NULL'))
    op.create_unique_constraint('uq_tasks_tenant_idempotency_key', 'tasks', ['tenant_id', 'idempotency_key'])
