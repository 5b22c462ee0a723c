"""state columns as Postgres enums: client batches, schedule runs (status, phase), webhook outbox
states of jobs and schedule runs, classifications

The values do not change. A CHECK or partial index whose expression compares the column with a text
literal cannot survive the type change (the stored expression says `= 'x'::text`), so those are dropped
first and recreated after; the CHECKs that only listed the allowed values are dropped for good (the
enum type now says it).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 10:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies: a migration must not change when the code's enums do
TYPES = {
    'client_batch_status': ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired',
                            'cancelling', 'cancelled'),
    'schedule_run_status': ('running', 'succeeded', 'failed'),
    'schedule_run_phase': ('pending', 'classifying', 'retrying', 'done'),
    'webhook_status': ('pending', 'delivered', 'failed'),
    'classification_status': ('pending', 'succeeded', 'failed'),
}
COLUMNS = (  # table, column, type
    ('client_batches', 'status', 'client_batch_status'),
    ('schedule_runs', 'status', 'schedule_run_status'),
    ('schedule_runs', 'phase', 'schedule_run_phase'),
    ('schedule_runs', 'webhook_status', 'webhook_status'),
    ('jobs', 'webhook_status', 'webhook_status'),
    ('classifications', 'status', 'classification_status'),
)
# CHECKs that only list the allowed values: the enum replaces them
VALUE_CHECKS = (
    ('client_batches', 'ck_client_batches_status_known', "status IN ('validating', 'failed', 'in_progress', "
     "'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')"),
    ('schedule_runs', 'ck_schedule_runs_status_valid', "status IN ('running', 'succeeded', 'failed')"),
    ('schedule_runs', 'ck_schedule_runs_phase_valid', "phase IN ('pending', 'classifying', 'retrying', 'done')"),
    ('jobs', 'ck_jobs_webhook_status_valid', "webhook_status IN ('pending', 'delivered', 'failed')"),
    ('classifications', 'ck_classifications_status_valid', "status IN ('pending', 'succeeded', 'failed')"),
)
# CHECKs and partial indexes that compare a converted column: dropped and recreated unchanged
KEPT_CHECKS = (
    ('schedule_runs', 'ck_schedule_runs_finished_at_iff_terminal',
     "(status IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)"),
)
INDEXES = (  # name, table, columns, unique, predicate
    ('ix_client_batches_due', 'client_batches', ['expires_at'], False, "status IN ('in_progress', 'finalizing')"),
    ('ix_schedule_runs_open', 'schedule_runs', ['phase'], False, "status = 'running'"),
    ('ix_schedule_runs_webhook_pending', 'schedule_runs', ['id'], False, "webhook_status = 'pending'"),
    ('ix_jobs_webhook_pending', 'jobs', ['webhook_nudged_at'], False, "webhook_status = 'pending'"),
    ('uq_classifications_schedule_item', 'classifications', ['schedule_id', 'item_id', 'text_hash'], True,
     "status <> 'failed'"),
)


def _drop_dependents() -> None:
    for name, table, _, _, _ in INDEXES:
        op.drop_index(name, table_name=table)
    for table, name, _ in KEPT_CHECKS:
        op.drop_constraint(op.f(name), table, type_='check')


def _create_dependents() -> None:
    for table, name, condition in KEPT_CHECKS:
        op.create_check_constraint(op.f(name), table, condition)
    for name, table, columns, unique, predicate in INDEXES:
        op.create_index(name, table, columns, unique=unique, postgresql_where=sa.text(predicate))


def upgrade() -> None:
    for name, values in TYPES.items():
        op.execute(f"CREATE TYPE {name} AS ENUM (" + ", ".join(f"'{v}'" for v in values) + ")")
    for table, name, _ in VALUE_CHECKS:
        op.drop_constraint(op.f(name), table, type_='check')
    _drop_dependents()
    for table, column, type_name in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {type_name} USING {column}::text::{type_name}")
    _create_dependents()


def downgrade() -> None:
    _drop_dependents()
    for table, column, _ in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE text USING {column}::text")
    _create_dependents()
    for table, name, condition in VALUE_CHECKS:
        op.create_check_constraint(op.f(name), table, condition)
    for name in TYPES:
        op.execute(f"DROP TYPE {name}")
