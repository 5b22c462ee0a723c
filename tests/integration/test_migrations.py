"""`alembic upgrade head` on an empty database, then autogenerate finds nothing to change."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from core.migrate import upgrade_to_head
from core.models import Base
from tests.support.stack import scratch_database

pytestmark = pytest.mark.integration


def test_upgrade_head_matches_the_models(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        upgrade_to_head(url)
        upgrade_to_head(url)  # idempotent
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(connection, opts={"compare_type": True})
                differences = compare_metadata(context, Base.metadata)
        finally:
            engine.dispose()
    assert differences == []
