"""`alembic upgrade head` on an empty database, then autogenerate finds nothing to change; migrations that
rewrite or reshape what is stored, with rows present, and their downgrades."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool, text
from sqlalchemy.exc import IntegrityError

from tests.support.stack import scratch_database
from tierbatch.base.ids import Month, new_task_ids
from tierbatch.db.models import Base
from tierbatch.db.partitions import autogenerate_includes
from tierbatch.migrations.runner import alembic_config, upgrade_to_head

pytestmark = pytest.mark.integration


def test_upgrade_head_matches_the_models(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        upgrade_to_head(url)
        upgrade_to_head(url)  # idempotent
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                                       "include_name": autogenerate_includes})
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
        command.upgrade(config, "0011")
        after = _schema_rules(url)
        # same predicates and CHECKs (only the value lists left), with enum casts instead of text ones
        assert {rule for rule in before if rule[0] not in _VALUE_CHECKS} == after
        command.downgrade(config, "0010")
        assert _schema_rules(url) == before
        command.upgrade(config, "0011")
        assert _schema_rules(url) == after


@dataclass(frozen=True)
class LedgerSchema:
    columns: list[tuple[str, ...]]  # (table, column, type, nullable, default)
    views: dict[str, str]
    function: str
    rules: set[tuple[str, str]]


def _ledger_schema(url: str) -> LedgerSchema:
    """The ledger's columns, the cost views' definitions and the rollup trigger's function body."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            columns = connection.execute(text(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_name IN ('ledger_entries', 'ledger_daily') "
                "ORDER BY table_name, ordinal_position")).all()
            views = connection.execute(text(
                "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1")).all()
            function = connection.scalar(text("SELECT prosrc FROM pg_proc WHERE proname = 'ledger_daily_apply'"))
    finally:
        engine.dispose()
    return LedgerSchema([tuple(c) for c in columns], {name: definition for name, definition in views},
                        str(function), _schema_rules(url))


_CACHE_WRITE_COLUMNS = {("ledger_entries", "cache_write_tokens"), ("ledger_entries", "cache_write_price"),
                        ("ledger_entries", "cache_write_cost_usd"), ("ledger_entries", "batch_discount"),
                        ("ledger_daily", "cache_write_tokens"), ("ledger_daily", "cache_write_cost_usd")}


def test_ledger_cache_writes_migration_adds_columns_and_downgrades(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0011")
        before = _ledger_schema(url)
        command.upgrade(config, "0012")
        after = _ledger_schema(url)
        added = {c[:2] for c in after.columns} - {c[:2] for c in before.columns}
        assert added == _CACHE_WRITE_COLUMNS
        for view in ("cost_ledger", "cost_daily", "cost_by_day", "cost_by_model", "cost_by_task_type"):
            assert "cache_write_tokens" in after.views[view] and "cache_write_cost_usd" in after.views[view], view
        assert "cache_write_cost_usd" in after.function
        assert after.rules != before.rules  # the token CHECK bounds cache writes too
        command.downgrade(config, "0011")
        assert _ledger_schema(url) == before
        command.upgrade(config, "0012")
        assert _ledger_schema(url) == after


def _batch_rows(url: str) -> dict[str, tuple[object, object, object]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT provider, completed_at = finished_at, completed_at IS NULL, ingested_at = finished_at "
                "FROM provider_batches")).all()
    finally:
        engine.dispose()
    return {name: (same_completed, no_completed, same_ingested) for name, same_completed, no_completed, same_ingested
            in rows}


def test_provider_batch_timestamps_backfill_check_and_downgrade(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0012")
        before = _schema_rules(url)
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.begin() as connection:
                # one row per history a batch could have had; `provider` names the case
                connection.execute(text(
                    "INSERT INTO provider_batches (id, provider, model, status, provider_status, submitted_at, "
                    " finished_at, updated_at, request_count, byte_size, attempts) VALUES "
                    "(gen_random_uuid(), 'done', 'm', 'done', 'completed', now() - interval '2 h',"
                    " now() - interval '1 h', now(), 1, 100, 1),"
                    "(gen_random_uuid(), 'emptied', 'm', 'done', NULL, NULL, now(), now(), 1, 100, 1),"
                    "(gen_random_uuid(), 'refused', 'm', 'failed', 'failed', now() - interval '2 h',"
                    " now() - interval '1 h', now(), 1, 100, 1),"
                    "(gen_random_uuid(), 'ingesting', 'm', 'ingesting', 'expired', now() - interval '2 h', NULL,"
                    " now() - interval '5 min', 1, 100, 1),"
                    "(gen_random_uuid(), 'submitted', 'm', 'submitted', 'in_progress', now(), NULL, now(), 1, 100, 1)"))
        finally:
            engine.dispose()
        command.upgrade(config, "0013")
        rows = _batch_rows(url)
        assert rows["done"] == (True, False, True)  # completed and ingested when it finished
        assert rows["emptied"] == (None, True, None)  # never submitted: neither
        assert rows["refused"] == (True, False, None)  # the provider finished it; nothing was ingested
        assert rows["ingesting"][1] is False and rows["ingesting"][2] is None  # completed (at its last update)
        assert rows["submitted"] == (None, True, None)
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            for bad in ("UPDATE provider_batches SET ingested_at = now() WHERE provider = 'refused'",
                        "UPDATE provider_batches SET ingested_at = now() WHERE provider = 'emptied'",
                        "UPDATE provider_batches SET completed_at = now() WHERE provider = 'emptied'"):
                with pytest.raises(Exception, match="ck_provider_batches_"), engine.begin() as connection:
                    connection.execute(text(bad))
        finally:
            engine.dispose()
        after = _schema_rules(url)
        assert {name for name, _ in after - before} == {
            "ck_provider_batches_completed_after_submitted", "ck_provider_batches_ingested_only_done",
            "ix_provider_batches_created", "ix_tasks_batch"}  # the last with tenant_id after batch_id
        command.downgrade(config, "0012")
        assert _schema_rules(url) == before
        command.upgrade(config, "0013")
        assert _schema_rules(url) == after


def _ledger_foreign_keys(url: str) -> list[tuple[str, str]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return [(name, definition) for name, definition in connection.execute(text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'f' AND conrelid = 'ledger_entries'::regclass ORDER BY 1")).all()]
    finally:
        engine.dispose()


def test_ledger_task_foreign_key_is_dropped_and_restored_on_downgrade(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0013")
        assert _ledger_foreign_keys(url) == [
            ("fk_ledger_entries_task_id_tasks", "FOREIGN KEY (task_id) REFERENCES tasks(id)")]
        command.upgrade(config, "0014")
        assert _ledger_foreign_keys(url) == []
        command.downgrade(config, "0013")
        assert _ledger_foreign_keys(url) == [
            ("fk_ledger_entries_task_id_tasks", "FOREIGN KEY (task_id) REFERENCES tasks(id)")]


def test_task_batch_foreign_key_is_dropped_and_restored_on_downgrade(base_database_url: str) -> None:
    kept = ["FOREIGN KEY (job_id) REFERENCES jobs(id)", "FOREIGN KEY (tenant_id) REFERENCES tenants(id)"]
    batch_key = "FOREIGN KEY (batch_id) REFERENCES provider_batches(id)"
    # the monthly partitions hold a copy of each key of the parent: they lose it with the parent's
    on_partitions = ("SELECT count(*) FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
                     "WHERE c.contype = 'f' AND r.relname LIKE 'tasks\\_%' "
                     "AND pg_get_constraintdef(c.oid) LIKE '%provider_batches%'")
    on_tasks = ("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'f' AND conrelid = 'tasks'::regclass ORDER BY 1")
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0016")
        assert [d for (d,) in _rows(url, on_tasks)] == sorted([batch_key, *kept])
        [(copies,)] = _rows(url, on_partitions)
        assert isinstance(copies, int) and copies > 0
        command.upgrade(config, "0017")
        assert [d for (d,) in _rows(url, on_tasks)] == kept
        assert _rows(url, on_partitions) == [(0,)]
        command.downgrade(config, "0016")
        assert [d for (d,) in _rows(url, on_tasks)] == sorted([batch_key, *kept])
        assert _rows(url, on_partitions) == [(copies,)]


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def _execute(url: str, sql: str, **params: object) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text(sql), params)
    finally:
        engine.dispose()


_CONTENT = {  # what must come through the rewrite unchanged, row for row
    "tasks": "SELECT * FROM tasks ORDER BY id",
    "ledger_entries": "SELECT * FROM ledger_entries ORDER BY id",
    "ledger_daily": "SELECT * FROM ledger_daily ORDER BY id",
    "quality_comparisons": "SELECT * FROM quality_comparisons ORDER BY id",
    "cost_ledger": "SELECT * FROM cost_ledger ORDER BY id",
}


def _content(url: str) -> dict[str, list[tuple[object, ...]]]:
    return {name: _rows(url, sql) for name, sql in _CONTENT.items()}


def _seed_0015(url: str, tenant: uuid.UUID, job: uuid.UUID, job_task_ids: list[uuid.UUID]) -> None:
    """Rows as 0015's code wrote them: 200 tasks with random ids (one with an idempotency key, one the
    shadow of another), a job's items with time-ordered ids of three months ago, a ledger row for each
    task (the rollup trigger sums them), a quality comparison."""
    _execute(url, "INSERT INTO tenants (id, name) VALUES (:tenant, 'migrated')", tenant=tenant)
    _execute(url, "INSERT INTO jobs (id, tenant_id, name, task_type, requested_tier, urgent) "
                  "VALUES (:job, :tenant, 'old-job', 'classification', 'light', false)", job=job, tenant=tenant)
    columns = ("id, tenant_id, job_id, item_id, idempotency_key, task_type, requested_tier, tier, tier_reason, "
               "urgent, request, status, mode, provider, model, served_model, output, attempts, finished_at")
    finished = ("'classification', 'light', 'light', 'config', false, '{\"messages\": []}', 'succeeded', 'batch', "
                "'sim', 'gpt-4o-mini', 'gpt-4o-mini', 'ok', 1, now()")
    _execute(url, f"INSERT INTO tasks ({columns}) SELECT gen_random_uuid(), :tenant, NULL, NULL, "
                  f"CASE WHEN i = 1 THEN 'key-1' END, {finished} FROM generate_series(1, 200) AS i", tenant=tenant)
    _execute(url, f"INSERT INTO tasks ({columns}) SELECT v.id, :tenant, :job, 'item-' || v.n, NULL, {finished} "
                  "FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS v(id, n)",
             tenant=tenant, job=job, ids=job_task_ids)
    _execute(url, "UPDATE tasks SET shadow_of = (SELECT id FROM tasks WHERE job_id IS NULL ORDER BY id LIMIT 1) "
                  "WHERE id = (SELECT id FROM tasks WHERE job_id IS NULL ORDER BY id OFFSET 1 LIMIT 1)")
    _execute(url, "INSERT INTO ledger_entries (tenant_id, task_id, job_id, task_type, tier, mode, provider, "
                  "requested_model, served_model, input_tokens, cached_tokens, output_tokens, reasoning_tokens, "
                  "cost_usd, baseline_cost_usd, unpriced) SELECT tenant_id, id, job_id, task_type, tier, 'batch', "
                  "'sim', 'gpt-4o-mini', 'gpt-4o-mini', 100, 0, 10, 0, 0.0001, 0.001, false FROM tasks")
    _execute(url, "INSERT INTO quality_comparisons (task_id, tenant_id, task_type, light_model, complex_model, "
                  "shadow_tier, agreed) SELECT id, tenant_id, task_type, 'gpt-4o-mini', 'gpt-4o', 'complex', true "
                  "FROM tasks WHERE job_id IS NULL ORDER BY id LIMIT 1")


def test_monthly_partitions_keep_every_row_and_id_and_downgrade(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0015")
        rules, ledger = _schema_rules(url), _ledger_schema(url)
        tenant, job = uuid.uuid4(), uuid.uuid4()
        three_months_ago = datetime.now(UTC) - timedelta(days=92)
        job_task_ids = new_task_ids(30, clock=three_months_ago.timestamp)  # as the jobs path made them
        _seed_0015(url, tenant, job, job_task_ids)
        before = _content(url)
        assert len(before["tasks"]) == 230 and len(before["ledger_entries"]) == 230

        command.upgrade(config, "0016")
        assert _content(url) == before  # every row, id and sum; ledger_daily not added to twice
        old_month = Month.of(three_months_ago)
        placed = dict(_rows(url, "SELECT id, tableoid::regclass::text FROM tasks"))
        assert {placed[i] for i in job_task_ids} == {f"tasks_{old_month}"}  # time-ordered ids: their month
        ledger_placed = dict(_rows(url, "SELECT task_id, tableoid::regclass::text FROM ledger_entries"))
        # a ledger row lives in its task's month
        assert ledger_placed == {task: home.replace("tasks", "ledger_entries", 1) for task, home in placed.items()}
        # random ids: mostly after 2100, the rest in the DEFAULT (or, rarely, a month)
        random_homes = {placed[row[0]] for row in before["tasks"] if row[0] not in set(job_task_ids)}
        assert "tasks_from_2100" in random_homes
        assert random_homes <= {"tasks_from_2100", "tasks_default", *(f"tasks_{Month.of(datetime.now(UTC)).plus(k)}"
                                                                       for k in range(-4, 2))}
        assert _rows(url, "SELECT idempotency_key, task_id FROM task_idempotency_keys") == _rows(
            url, "SELECT idempotency_key, id FROM tasks WHERE idempotency_key IS NOT NULL")
        assert sorted(_rows(url, "SELECT item_id FROM job_item_ids")) == [(f"item-{n}",) for n in sorted(
            range(1, 31), key=lambda n: f"item-{n}")]
        # the invariants the dropped unique indexes held, now held by the partitioned table and the side tables
        task_id = job_task_ids[0]
        for duplicate in (
                "INSERT INTO ledger_entries (tenant_id, task_id, task_type, tier, mode, provider, requested_model, "
                "served_model, input_tokens, cached_tokens, output_tokens, reasoning_tokens, unpriced) "
                "SELECT tenant_id, id, task_type, tier, 'immediate', 'sim', 'm', 'm', 1, 0, 1, 0, true FROM tasks "
                f"WHERE id = '{task_id}'",
                f"INSERT INTO job_item_ids (job_id, item_id) VALUES ('{job}', 'item-1')",
                f"INSERT INTO task_idempotency_keys VALUES ('{tenant}', 'key-1', '{task_id}')"):
            with pytest.raises(IntegrityError, match="duplicate key"):
                _execute(url, duplicate)

        command.downgrade(config, "0015")
        assert _content(url) == before
        assert _schema_rules(url) == rules and _ledger_schema(url) == ledger
        command.upgrade(config, "0016")
        assert _content(url) == before
