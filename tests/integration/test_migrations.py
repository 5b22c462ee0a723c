"""`alembic upgrade head` on an empty database, then autogenerate finds nothing to change."""

from __future__ import annotations

import re

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool, text

from tests.support.stack import scratch_database
from tierbatch.db.models import Base
from tierbatch.migrations.runner import alembic_config, upgrade_to_head

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


def _schema_rules(url: str) -> set[tuple[str, str]]:
    """Every CHECK and index definition of the public schema, casts stripped: what the rows must obey
    and what the planner can use, independent of a column's type."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            checks = connection.execute(text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'c' AND connamespace = 'public'::regnamespace")).all()
            indexes = connection.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")).all()
    finally:
        engine.dispose()
    return {(name, re.sub(r"::[a-z_]+(\[\])?", "", definition)) for name, definition in [*checks, *indexes]}


# the CHECKs that only listed a column's values: the enum types replace them
_VALUE_CHECKS = {"ck_client_batches_status_known", "ck_schedule_runs_status_valid", "ck_schedule_runs_phase_valid",
                 "ck_jobs_webhook_status_valid", "ck_classifications_status_valid"}


def test_state_enums_keep_every_rule_and_downgrade(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0010")
        before = _schema_rules(url)
        command.upgrade(config, "head")
        after = _schema_rules(url)
        # same predicates and CHECKs (only the value lists left), with enum casts instead of text ones
        assert {rule for rule in before if rule[0] not in _VALUE_CHECKS} == after
        command.downgrade(config, "0010")
        assert _schema_rules(url) == before
        command.upgrade(config, "head")
        assert _schema_rules(url) == after
