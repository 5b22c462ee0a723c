"""tasks without the per-row foreign key to their provider batch

A task's `batch_id` is only ever set to a batch row inserted in the same transaction: by the claim
(`tasks.transitions.claim_for_batch`) and by the split of a batch the provider refused
(`batching.lifecycle.split_failed_batch`); provider batches are never deleted. The foreign key's per-row
check (a probe of `provider_batches` and a `FOR KEY SHARE` lock of the same batch row, once per task) was
about 0.7 s of the 1.6 s that claiming a 50,000-task batch took against a million-task table. The index
`ix_tasks_batch` stays; so do the keys to tenants and jobs (a task must name its tenant; their checks cost a
bulk insert about a fifth and a single insert nothing measurable).

Downgrade adds the key back, validated against the rows already written.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH_KEY = 'fk_tasks_batch_id_provider_batches'


def upgrade() -> None:
    op.drop_constraint(op.f(BATCH_KEY), 'tasks', type_='foreignkey')


def downgrade() -> None:
    op.create_foreign_key(op.f(BATCH_KEY), 'tasks', 'provider_batches', ['batch_id'], ['id'])
