"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('ledger_daily',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=True),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('mode', sa.Enum('immediate', 'batch', 'shadow', 'cache', name='serve_mode'), nullable=False),
    sa.Column('provider', sa.Text(), nullable=False),
    sa.Column('served_model', sa.Text(), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('unpriced_requests', sa.BigInteger(), nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
    sa.Column('input_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('cached_input_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('output_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('reasoning_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('shadow_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('baseline_cost_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.Column('savings_usd', sa.Numeric(precision=20, scale=10), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_daily'))
    )
    op.create_index('ix_ledger_daily_day', 'ledger_daily', ['day'], unique=False)
    op.create_index('uq_ledger_daily_key', 'ledger_daily', ['tenant_id', 'day', 'task_type', 'tier', 'mode', 'provider', 'served_model', 'job_id'], unique=True, postgresql_nulls_not_distinct=True)
    op.create_table('provider_batches',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('provider', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('preparing', 'submitted', 'ingesting', 'done', 'failed', name='batch_status'), nullable=False),
    sa.Column('provider_status', sa.Enum('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled', name='provider_batch_status'), nullable=True),
    sa.Column('provider_batch_id', sa.Text(), nullable=True),
    sa.Column('input_file_id', sa.Text(), nullable=True),
    sa.Column('output_file_id', sa.Text(), nullable=True),
    sa.Column('error_file_id', sa.Text(), nullable=True),
    sa.Column('request_count', sa.Integer(), nullable=False),
    sa.Column('byte_size', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status IN ('done', 'failed')) = (finished_at IS NOT NULL)", name=op.f('ck_provider_batches_finished_at_iff_terminal')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_provider_batches')),
    sa.UniqueConstraint('provider_batch_id', name=op.f('uq_provider_batches_provider_batch_id'))
    )
    op.create_index('ix_provider_batches_open', 'provider_batches', ['status'], unique=False, postgresql_where=sa.text("status NOT IN ('done', 'failed')"))
    op.create_table('tenants',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('api_key_hash', sa.Text(), nullable=False),
    sa.Column('api_key_prefix', sa.Text(), nullable=False),
    sa.Column('monthly_budget_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('api_key_hash', name=op.f('uq_tenants_api_key_hash'))
    )
    op.create_table('files',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('purpose', sa.Text(), nullable=False),
    sa.Column('filename', sa.Text(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('line_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("purpose IN ('batch', 'batch_output')", name=op.f('ck_files_purpose_known')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_files_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_files'))
    )
    op.create_index('ix_files_tenant_created', 'files', ['tenant_id', 'created_at'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('requested_tier', sa.Enum('light', 'complex', 'auto', name='requested_tier'), nullable=False),
    sa.Column('urgent', sa.Boolean(), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_jobs_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_tenant_id'), 'jobs', ['tenant_id'], unique=False)
    op.create_table('routing_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('actor', sa.Text(), nullable=False),
    sa.Column('action', sa.Text(), nullable=False),
    sa.Column('from_tier', sa.Enum('light', 'complex', name='tier'), nullable=True),
    sa.Column('to_tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('pinned', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('figures', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_routing_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_events'))
    )
    op.create_index('ix_routing_events_tenant_task_type', 'routing_events', ['tenant_id', 'task_type', 'created_at'], unique=False)
    op.create_table('routing_rules',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('pinned', sa.Boolean(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_routing_rules_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_rules')),
    sa.UniqueConstraint('tenant_id', 'task_type', name='uq_routing_rules_tenant_task_type')
    )
    op.create_table('schedules',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('cron', sa.Text(), nullable=False),
    sa.Column('timezone', sa.Text(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('job', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('source', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('sink', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_secret', sa.Text(), nullable=False),
    sa.Column('cursor', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('next_fire_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_fire_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_schedules_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedules')),
    sa.UniqueConstraint('tenant_id', 'name', name='uq_schedules_tenant_name')
    )
    op.create_index('ix_schedules_due', 'schedules', ['next_fire_at'], unique=False, postgresql_where=sa.text('enabled'))
    op.create_table('client_batches',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=False),
    sa.Column('input_file_id', sa.Text(), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('completion_window', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('output_file_id', sa.Text(), nullable=True),
    sa.Column('error_file_id', sa.Text(), nullable=True),
    sa.Column('request_total', sa.Integer(), nullable=False),
    sa.Column('request_completed', sa.Integer(), nullable=True),
    sa.Column('request_failed', sa.Integer(), nullable=True),
    sa.Column('usage', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')", name=op.f('ck_client_batches_status_known')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_client_batches_job_id_jobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_client_batches_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_client_batches')),
    sa.UniqueConstraint('job_id', name=op.f('uq_client_batches_job_id'))
    )
    op.create_index('ix_client_batches_tenant_created', 'client_batches', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_table('file_parts',
    sa.Column('file_id', sa.Text(), nullable=False),
    sa.Column('part', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['files.id'], name=op.f('fk_file_parts_file_id_files'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('file_id', 'part', name=op.f('pk_file_parts'))
    )
    op.create_table('schedule_runs',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('schedule_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('fire_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('trigger', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('phase', sa.Text(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=True),
    sa.Column('retry_job_id', sa.UUID(), nullable=True),
    sa.Column('task_count', sa.Integer(), nullable=False),
    sa.Column('skipped_count', sa.Integer(), nullable=False),
    sa.Column('source_counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('label_counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('cursor_before', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('cursor_after', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('sink_path', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('webhook_status', sa.Text(), nullable=True),
    sa.Column('webhook_body', sa.Text(), nullable=True),
    sa.Column('nudged_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)", name=op.f('ck_schedule_runs_finished_at_iff_terminal')),
    sa.CheckConstraint("phase IN ('pending', 'classifying', 'retrying', 'done')", name=op.f('ck_schedule_runs_phase_valid')),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name=op.f('ck_schedule_runs_status_valid')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_schedule_runs_job_id_jobs')),
    sa.ForeignKeyConstraint(['retry_job_id'], ['jobs.id'], name=op.f('fk_schedule_runs_retry_job_id_jobs')),
    sa.ForeignKeyConstraint(['schedule_id'], ['schedules.id'], name=op.f('fk_schedule_runs_schedule_id_schedules'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_schedule_runs_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedule_runs')),
    sa.UniqueConstraint('schedule_id', 'fire_time', name='uq_schedule_runs_schedule_fire_time')
    )
    op.create_index('ix_schedule_runs_open', 'schedule_runs', ['phase'], unique=False, postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_schedule_runs_schedule_created', 'schedule_runs', ['schedule_id', 'created_at'], unique=False)
    op.create_index('ix_schedule_runs_webhook_pending', 'schedule_runs', ['id'], unique=False, postgresql_where=sa.text("webhook_status = 'pending'"))
    op.create_table('tasks',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=True),
    sa.Column('item_id', sa.Text(), nullable=True),
    sa.Column('idempotency_key', sa.Text(), nullable=True),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('requested_tier', sa.Enum('light', 'complex', 'auto', name='requested_tier'), nullable=False),
    sa.Column('tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('tier_reason', sa.Text(), nullable=False),
    sa.Column('urgent', sa.Boolean(), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('status', sa.Enum('queued', 'waiting_batch', 'in_batch', 'running', 'succeeded', 'failed', 'cancelled', name='task_status'), nullable=False),
    sa.Column('mode', sa.Enum('immediate', 'batch', 'shadow', 'cache', name='serve_mode'), nullable=True),
    sa.Column('provider', sa.Text(), nullable=True),
    sa.Column('model', sa.Text(), nullable=True),
    sa.Column('served_model', sa.Text(), nullable=True),
    sa.Column('batch_id', sa.UUID(), nullable=True),
    sa.Column('output', sa.Text(), nullable=True),
    sa.Column('response', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('input_tokens', sa.BigInteger(), nullable=True),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=True),
    sa.Column('output_tokens', sa.BigInteger(), nullable=True),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('baseline_cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('lease_token', sa.UUID(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)", name=op.f('ck_tasks_finished_at_iff_terminal')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_tasks_attempts_non_negative')),
    sa.ForeignKeyConstraint(['batch_id'], ['provider_batches.id'], name=op.f('fk_tasks_batch_id_provider_batches')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_tasks_job_id_jobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tasks_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('tenant_id', 'idempotency_key', name='uq_tasks_tenant_idempotency_key')
    )
    op.create_index('ix_tasks_batch', 'tasks', ['batch_id'], unique=False, postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('ix_tasks_batch_deadline', 'tasks', ['deadline'], unique=False, postgresql_where=sa.text("deadline IS NOT NULL AND status IN ('waiting_batch', 'in_batch')"))
    op.create_index('ix_tasks_job', 'tasks', ['job_id'], unique=False, postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_tasks_live', 'tasks', ['status', 'dispatched_at'], unique=False, postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.create_index('ix_tasks_tenant_created', 'tasks', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_index('ix_tasks_tenant_live', 'tasks', ['tenant_id'], unique=False, postgresql_where=sa.text("status IN ('queued', 'waiting_batch', 'in_batch', 'running')"))
    op.create_index('ix_tasks_waiting_batch', 'tasks', ['provider', 'model', 'created_at'], unique=False, postgresql_where=sa.text("status = 'waiting_batch'"))
    op.create_index('uq_tasks_job_item', 'tasks', ['job_id', 'item_id'], unique=True, postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_table('classifications',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('schedule_id', sa.UUID(), nullable=False),
    sa.Column('run_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('item_id', sa.Text(), nullable=False),
    sa.Column('text_hash', sa.Text(), nullable=False),
    sa.Column('task_id', sa.UUID(), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('output', sa.Text(), nullable=True),
    sa.Column('model', sa.Text(), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('classified_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name=op.f('ck_classifications_status_valid')),
    sa.ForeignKeyConstraint(['run_id'], ['schedule_runs.id'], name=op.f('fk_classifications_run_id_schedule_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['schedule_id'], ['schedules.id'], name=op.f('fk_classifications_schedule_id_schedules'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_classifications_task_id_tasks')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_classifications_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_classifications')),
    sa.UniqueConstraint('run_id', 'item_id', name='uq_classifications_run_item')
    )
    op.create_index('ix_classifications_task', 'classifications', ['task_id'], unique=False)
    op.create_index('uq_classifications_schedule_item', 'classifications', ['schedule_id', 'item_id', 'text_hash'], unique=True, postgresql_where=sa.text("status <> 'failed'"))
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('task_id', sa.UUID(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=True),
    sa.Column('batch_id', sa.UUID(), nullable=True),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('mode', sa.Enum('immediate', 'batch', 'shadow', 'cache', name='serve_mode'), nullable=False),
    sa.Column('provider', sa.Text(), nullable=False),
    sa.Column('requested_model', sa.Text(), nullable=False),
    sa.Column('served_model', sa.Text(), nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
    sa.Column('input_price', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('cached_input_price', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('output_price', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('input_cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('cached_input_cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('output_cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('baseline_cost_usd', sa.Numeric(precision=20, scale=10), nullable=True),
    sa.Column('unpriced', sa.Boolean(), nullable=False),
    sa.Column('latency_ms', sa.Integer(), nullable=True),
    sa.Column('usage_estimated', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0 AND reasoning_tokens >= 0 AND cached_tokens <= input_tokens', name=op.f('ck_ledger_entries_token_counts_valid')),
    sa.CheckConstraint('unpriced = (cost_usd IS NULL)', name=op.f('ck_ledger_entries_unpriced_iff_no_cost')),
    sa.ForeignKeyConstraint(['batch_id'], ['provider_batches.id'], name=op.f('fk_ledger_entries_batch_id_provider_batches')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_ledger_entries_job_id_jobs')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_ledger_entries_task_id_tasks')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_ledger_entries_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entries'))
    )
    op.create_index('ix_ledger_entries_created_brin', 'ledger_entries', ['created_at'], unique=False, postgresql_using='brin')
    op.create_index('ix_ledger_entries_job', 'ledger_entries', ['job_id'], unique=False, postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_ledger_entries_tenant_created', 'ledger_entries', ['tenant_id', 'created_at'], unique=False)
    op.create_index('uq_ledger_entries_task_billed', 'ledger_entries', ['task_id'], unique=True, postgresql_where=sa.text("mode <> 'shadow'"))
    op.create_table('quality_comparisons',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('task_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('task_type', sa.Text(), nullable=False),
    sa.Column('light_model', sa.Text(), nullable=False),
    sa.Column('complex_model', sa.Text(), nullable=False),
    sa.Column('shadow_tier', sa.Enum('light', 'complex', name='tier'), nullable=False),
    sa.Column('agreed', sa.Boolean(), nullable=True),
    sa.Column('score', sa.Numeric(precision=6, scale=4, asdecimal=False), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_quality_comparisons_task_id_tasks')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_quality_comparisons_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quality_comparisons')),
    sa.UniqueConstraint('task_id', name='uq_quality_comparisons_task_id')
    )
    op.create_index('ix_quality_comparisons_window', 'quality_comparisons', ['tenant_id', 'task_type', 'created_at'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('run_id', sa.UUID(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['schedule_runs.id'], name=op.f('fk_webhook_deliveries_run_id_schedule_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_webhook_deliveries_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('run_id', 'attempt', name='uq_webhook_deliveries_run_attempt')
    )


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_quality_comparisons_window', table_name='quality_comparisons')
    op.drop_table('quality_comparisons')
    op.drop_index('uq_ledger_entries_task_billed', table_name='ledger_entries', postgresql_where=sa.text("mode <> 'shadow'"))
    op.drop_index('ix_ledger_entries_tenant_created', table_name='ledger_entries')
    op.drop_index('ix_ledger_entries_job', table_name='ledger_entries', postgresql_where=sa.text('job_id IS NOT NULL'))
    op.drop_index('ix_ledger_entries_created_brin', table_name='ledger_entries', postgresql_using='brin')
    op.drop_table('ledger_entries')
    op.drop_index('uq_classifications_schedule_item', table_name='classifications', postgresql_where=sa.text("status <> 'failed'"))
    op.drop_index('ix_classifications_task', table_name='classifications')
    op.drop_table('classifications')
    op.drop_index('uq_tasks_job_item', table_name='tasks', postgresql_where=sa.text('job_id IS NOT NULL'))
    op.drop_index('ix_tasks_waiting_batch', table_name='tasks', postgresql_where=sa.text("status = 'waiting_batch'"))
    op.drop_index('ix_tasks_tenant_live', table_name='tasks', postgresql_where=sa.text("status IN ('queued', 'waiting_batch', 'in_batch', 'running')"))
    op.drop_index('ix_tasks_tenant_created', table_name='tasks')
    op.drop_index('ix_tasks_live', table_name='tasks', postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_index('ix_tasks_job', table_name='tasks', postgresql_where=sa.text('job_id IS NOT NULL'))
    op.drop_index('ix_tasks_batch_deadline', table_name='tasks', postgresql_where=sa.text("deadline IS NOT NULL AND status IN ('waiting_batch', 'in_batch')"))
    op.drop_index('ix_tasks_batch', table_name='tasks', postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.drop_table('tasks')
    op.drop_index('ix_schedule_runs_webhook_pending', table_name='schedule_runs', postgresql_where=sa.text("webhook_status = 'pending'"))
    op.drop_index('ix_schedule_runs_schedule_created', table_name='schedule_runs')
    op.drop_index('ix_schedule_runs_open', table_name='schedule_runs', postgresql_where=sa.text("status = 'running'"))
    op.drop_table('schedule_runs')
    op.drop_table('file_parts')
    op.drop_index('ix_client_batches_tenant_created', table_name='client_batches')
    op.drop_table('client_batches')
    op.drop_index('ix_schedules_due', table_name='schedules', postgresql_where=sa.text('enabled'))
    op.drop_table('schedules')
    op.drop_table('routing_rules')
    op.drop_index('ix_routing_events_tenant_task_type', table_name='routing_events')
    op.drop_table('routing_events')
    op.drop_index(op.f('ix_jobs_tenant_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index('ix_files_tenant_created', table_name='files')
    op.drop_table('files')
    op.drop_table('tenants')
    op.drop_index('ix_provider_batches_open', table_name='provider_batches', postgresql_where=sa.text("status NOT IN ('done', 'failed')"))
    op.drop_table('provider_batches')
    op.drop_index('uq_ledger_daily_key', table_name='ledger_daily', postgresql_nulls_not_distinct=True)
    op.drop_index('ix_ledger_daily_day', table_name='ledger_daily')
    op.drop_table('ledger_daily')
    sa.Enum(name='tier').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='serve_mode').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='batch_status').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='provider_batch_status').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='requested_tier').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='task_status').drop(op.get_bind(), checkfirst=True)
