"""job webhooks: a signed `job.finished` POST for bulk jobs with a webhook_url, secret per tenant

- tenants.webhook_secret: existing tenants get one here, from the column's default (evaluated per row:
  two gen_random_uuid(), core Postgres since 13, so no extension); it was never shown to anyone, so an
  admin rotates it (`POST /v1/admin/tenants/{id}/webhook-secret`) to learn it.
- jobs: webhook_url, the claim (finished_notified_at, set once), the delivery state and the signed body,
  with two small partial indexes for the beat check.
- webhook_deliveries: an attempt belongs to a schedule run or (new) to a job, exactly one of the two.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 04:04:37.768736
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SECRET_DEFAULT = "'whsec_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"


def upgrade() -> None:
    # a volatile default is evaluated for each existing row: every tenant gets its own secret
    op.add_column('tenants', sa.Column('webhook_secret', sa.Text(), server_default=sa.text(SECRET_DEFAULT), nullable=False))

    op.add_column('jobs', sa.Column('webhook_url', sa.Text(), nullable=True))
    op.add_column('jobs', sa.Column('finished_notified_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('webhook_status', sa.Text(), nullable=True))
    op.add_column('jobs', sa.Column('webhook_body', sa.Text(), nullable=True))
    op.add_column('jobs', sa.Column('webhook_nudged_at', sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f('ck_jobs_webhook_status_valid'), 'jobs',
                               "webhook_status IN ('pending', 'delivered', 'failed')")
    op.create_check_constraint(op.f('ck_jobs_webhook_status_iff_notified'), 'jobs',
                               '(webhook_status IS NULL) = (finished_notified_at IS NULL)')
    op.create_index('ix_jobs_webhook_pending', 'jobs', ['webhook_nudged_at'], unique=False, postgresql_where=sa.text("webhook_status = 'pending'"))
    op.create_index('ix_jobs_webhook_unnotified', 'jobs', ['created_at'], unique=False, postgresql_where=sa.text('webhook_url IS NOT NULL AND finished_notified_at IS NULL'))

    op.add_column('webhook_deliveries', sa.Column('job_id', sa.UUID(), nullable=True))
    op.alter_column('webhook_deliveries', 'run_id', existing_type=sa.UUID(), nullable=True)
    op.create_unique_constraint('uq_webhook_deliveries_job_attempt', 'webhook_deliveries', ['job_id', 'attempt'])
    op.create_foreign_key(op.f('fk_webhook_deliveries_job_id_jobs'), 'webhook_deliveries', 'jobs', ['job_id'], ['id'], ondelete='CASCADE')
    op.create_check_constraint(op.f('ck_webhook_deliveries_one_subject'), 'webhook_deliveries',
                               '(run_id IS NULL) <> (job_id IS NULL)')


def downgrade() -> None:
    # job attempts have no place in the old table (run_id NOT NULL): they go
    op.execute('DELETE FROM webhook_deliveries WHERE job_id IS NOT NULL')
    op.drop_constraint(op.f('ck_webhook_deliveries_one_subject'), 'webhook_deliveries', type_='check')
    op.drop_constraint(op.f('fk_webhook_deliveries_job_id_jobs'), 'webhook_deliveries', type_='foreignkey')
    op.drop_constraint('uq_webhook_deliveries_job_attempt', 'webhook_deliveries', type_='unique')
    op.alter_column('webhook_deliveries', 'run_id', existing_type=sa.UUID(), nullable=False)
    op.drop_column('webhook_deliveries', 'job_id')

    op.drop_index('ix_jobs_webhook_unnotified', table_name='jobs', postgresql_where=sa.text('webhook_url IS NOT NULL AND finished_notified_at IS NULL'))
    op.drop_index('ix_jobs_webhook_pending', table_name='jobs', postgresql_where=sa.text("webhook_status = 'pending'"))
    op.drop_constraint(op.f('ck_jobs_webhook_status_iff_notified'), 'jobs', type_='check')
    op.drop_constraint(op.f('ck_jobs_webhook_status_valid'), 'jobs', type_='check')
    op.drop_column('jobs', 'webhook_nudged_at')
    op.drop_column('jobs', 'webhook_body')
    op.drop_column('jobs', 'webhook_status')
    op.drop_column('jobs', 'finished_notified_at')
    op.drop_column('jobs', 'webhook_url')

    op.drop_column('tenants', 'webhook_secret')
    # no enum type was created by this revision: nothing else to drop
