"""provider batches: when the provider completed a batch and when its output was ingested

`provider_batches` gains `completed_at` (the poll that found the provider's batch finished: completed,
expired, failed or cancelled) and `ingested_at` (ingestion of its output finished; the batch is `done`),
so turnaround (`completed_at - submitted_at`) and ingestion time are queries. CHECKs: a batch completes
only after it was submitted; only a `done` batch that completed is ingested.

Backfill: rows written before this revision recorded only `finished_at`. A submitted batch whose
provider status is terminal completed at the latest when it finished (`finished_at`), or, still
`ingesting`, at its last update; a `done` one that was submitted was ingested at `finished_at`. A batch
emptied before submission (done, never submitted) keeps both NULL. The listing's index
(`created_at`, `id`, newest first) comes with them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMPLETED_CHECK = 'ck_provider_batches_completed_after_submitted'
COMPLETED_RULE = 'completed_at IS NULL OR submitted_at IS NOT NULL'
INGESTED_CHECK = 'ck_provider_batches_ingested_only_done'
INGESTED_RULE = "ingested_at IS NULL OR (status = 'done' AND completed_at IS NOT NULL)"
CREATED_INDEX = 'ix_provider_batches_created'
# frozen copy of the provider statuses lifecycle.TERMINAL_PROVIDER_STATUSES moves to `ingesting`
TERMINAL_PROVIDER = "('completed', 'failed', 'expired', 'cancelled')"


def upgrade() -> None:
    op.add_column('provider_batches', sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('provider_batches', sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE provider_batches SET completed_at = coalesce(finished_at, updated_at) "
        f"WHERE submitted_at IS NOT NULL AND provider_status IN {TERMINAL_PROVIDER}"
    )
    op.execute(
        "UPDATE provider_batches SET ingested_at = finished_at "
        "WHERE status = 'done' AND completed_at IS NOT NULL"
    )
    op.create_check_constraint(op.f(COMPLETED_CHECK), 'provider_batches', COMPLETED_RULE)
    op.create_check_constraint(op.f(INGESTED_CHECK), 'provider_batches', INGESTED_RULE)
    op.create_index(CREATED_INDEX, 'provider_batches', ['created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index(CREATED_INDEX, table_name='provider_batches')
    op.drop_constraint(op.f(INGESTED_CHECK), 'provider_batches', type_='check')
    op.drop_constraint(op.f(COMPLETED_CHECK), 'provider_batches', type_='check')
    op.drop_column('provider_batches', 'ingested_at')
    op.drop_column('provider_batches', 'completed_at')
