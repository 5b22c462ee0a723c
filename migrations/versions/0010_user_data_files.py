"""files: purpose `user_data` (CSV or JSONL uploaded for a schedule's source)

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-01 09:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f('ck_files_purpose_known'), 'files', type_='check')
    op.create_check_constraint(op.f('ck_files_purpose_known'), 'files', "purpose IN ('batch', 'batch_output', 'user_data')")


def downgrade() -> None:
    op.execute("DELETE FROM files WHERE purpose = 'user_data'")
    op.drop_constraint(op.f('ck_files_purpose_known'), 'files', type_='check')
    op.create_check_constraint(op.f('ck_files_purpose_known'), 'files', "purpose IN ('batch', 'batch_output')")
