"""webhook secrets encrypted at rest; no receiver answer kept in the attempts

- tenants.webhook_secret and schedules.webhook_secret (plain text) become `webhook_secret_encrypted`,
  encrypted with the key in TIERBATCH_SECRET_KEY (tierbatch/base/secretbox.py). When that key is set for the
  migration (`tierbatch migrate` reads the environment; `tierbatch up` passes its own), every existing
  secret is encrypted here and keeps signing. Without it, the plain secrets are dropped and the columns
  stay NULL: an admin rotates each tenant's secret (`POST /v1/admin/tenants/{id}/webhook-secret`) and
  schedules with a webhook are re-created, or their attempts fail with "no webhook secret".
- webhook_deliveries.error no longer quotes the receiver's answer: rows written before keep only
  `HTTP <status>`.

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-01 09:40:00.000000
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from tierbatch.base.secretbox import SecretBox
from tierbatch.base.settings import Settings

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")
TABLES = ("tenants", "schedules")
SECRET_DEFAULT = "'whsec_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"


def _box() -> SecretBox | None:
    """The key given to this migration run (tierbatch.migrations.runner), else the environment's."""
    given = context.config.attributes.get("secret_key")
    return SecretBox.parse(given if given is not None else Settings().secret_key)


def upgrade() -> None:
    box = _box()
    connection = op.get_bind()
    for table in TABLES:
        op.add_column(table, sa.Column('webhook_secret_encrypted', sa.Text(), nullable=True))
        if box is None:
            count = connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
            if count:
                log.warning("%s: TIERBATCH_SECRET_KEY is not set: %d plain webhook secrets dropped; rotate them",
                            table, count)
        else:
            rows = connection.execute(sa.text(f"SELECT id, webhook_secret FROM {table}")).all()
            for row_id, secret in rows:
                connection.execute(sa.text(f"UPDATE {table} SET webhook_secret_encrypted = :sealed WHERE id = :id"),
                                   {"sealed": box.seal(secret), "id": row_id})
        op.drop_column(table, 'webhook_secret')
    op.execute("UPDATE webhook_deliveries SET error = 'HTTP ' || status_code "
               "WHERE status_code IS NOT NULL AND error IS NOT NULL")


def downgrade() -> None:
    box = _box()
    connection = op.get_bind()
    for table in TABLES:
        op.add_column(table, sa.Column('webhook_secret', sa.Text(), server_default=sa.text(SECRET_DEFAULT),
                                       nullable=False))
        if box is not None:
            rows = connection.execute(sa.text(f"SELECT id, webhook_secret_encrypted FROM {table} "
                                              "WHERE webhook_secret_encrypted IS NOT NULL")).all()
            for row_id, sealed in rows:
                connection.execute(sa.text(f"UPDATE {table} SET webhook_secret = :plain WHERE id = :id"),
                                   {"plain": box.open(sealed), "id": row_id})
        if table == "schedules":  # 0001 has no default there
            op.alter_column(table, 'webhook_secret', server_default=None)
        op.drop_column(table, 'webhook_secret_encrypted')
