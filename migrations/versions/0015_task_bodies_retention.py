"""tasks: retention of bodies

`tasks` gains `bodies_removed_at`: when the retention tick (tierbatch/tasks/retention.py) removed the
task's prompt (`request` becomes `{}`), `output` and `response`; NULL while they are kept. A CHECK keeps it
to finished tasks. The partial index `ix_tasks_bodies_kept` on `finished_at` holds exactly the finished
tasks whose bodies are kept, so the purge finds the oldest of them without reading the ones it emptied.

Every existing finished task gets an entry in the new index (built once here, without a table rewrite: the
column is nullable with no default).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 16:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = 'ix_tasks_bodies_kept'
KEPT = sa.text('finished_at IS NOT NULL AND bodies_removed_at IS NULL')
CHECK = 'ck_tasks_bodies_removed_only_finished'
CHECK_RULE = 'bodies_removed_at IS NULL OR finished_at IS NOT NULL'


def upgrade() -> None:
    op.add_column('tasks', sa.Column('bodies_removed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f(CHECK), 'tasks', CHECK_RULE)
    op.create_index(INDEX, 'tasks', ['finished_at'], unique=False, postgresql_where=KEPT)


def downgrade() -> None:
    op.drop_index(INDEX, table_name='tasks', postgresql_where=KEPT)
    op.drop_constraint(op.f(CHECK), 'tasks', type_='check')
    op.drop_column('tasks', 'bodies_removed_at')
