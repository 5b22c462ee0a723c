"""api keys: several per tenant, revocable; per-tenant rate limits

Each tenant's key digest moves from `tenants` into its own row of `api_keys` (same digest, same prefix,
the tenant's creation time), so every key handed out so far keeps working. `tenants` gains the two
rate-limit columns (NULL: no limit).

The downgrade puts back one key per tenant: its oldest key still valid, else its oldest key (a tenant
whose keys are all revoked gets a digest nobody can present), and drops the other keys.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 09:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('tenant_id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('key_hash', sa.Text(), nullable=False),
        sa.Column('prefix', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint('revoked_at IS NULL OR revoked_at >= created_at',
                           name=op.f('ck_api_keys_revoked_after_created')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash')),
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.execute("INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) "
               "SELECT gen_random_uuid(), id, api_key_hash, api_key_prefix, created_at FROM tenants")
    op.drop_constraint(op.f('uq_tenants_api_key_hash'), 'tenants', type_='unique')
    op.drop_column('tenants', 'api_key_hash')
    op.drop_column('tenants', 'api_key_prefix')
    op.add_column('tenants', sa.Column('requests_per_minute', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('tokens_per_minute', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_tenants_requests_per_minute_positive'), 'tenants', 'requests_per_minute > 0')
    op.create_check_constraint(op.f('ck_tenants_tokens_per_minute_positive'), 'tenants', 'tokens_per_minute > 0')


def downgrade() -> None:
    op.drop_constraint(op.f('ck_tenants_tokens_per_minute_positive'), 'tenants', type_='check')
    op.drop_constraint(op.f('ck_tenants_requests_per_minute_positive'), 'tenants', type_='check')
    op.drop_column('tenants', 'tokens_per_minute')
    op.drop_column('tenants', 'requests_per_minute')
    op.add_column('tenants', sa.Column('api_key_prefix', sa.Text(), nullable=True))
    op.add_column('tenants', sa.Column('api_key_hash', sa.Text(), nullable=True))
    op.execute("""
        UPDATE tenants t SET api_key_hash = k.key_hash, api_key_prefix = k.prefix
        FROM (SELECT DISTINCT ON (tenant_id) tenant_id, key_hash, prefix FROM api_keys
              ORDER BY tenant_id, revoked_at IS NOT NULL, created_at) k
        WHERE k.tenant_id = t.id
    """)
    # no key left, or only revoked ones: a digest of random bytes, which no key hashes to
    op.execute("UPDATE tenants SET api_key_hash = 'revoked-' || gen_random_uuid()::text, api_key_prefix = 'tb_' "
               "WHERE api_key_hash IS NULL OR id IN (SELECT tenant_id FROM api_keys GROUP BY tenant_id "
               "HAVING bool_and(revoked_at IS NOT NULL))")
    op.alter_column('tenants', 'api_key_hash', nullable=False)
    op.alter_column('tenants', 'api_key_prefix', nullable=False)
    op.create_unique_constraint(op.f('uq_tenants_api_key_hash'), 'tenants', ['api_key_hash'])
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
