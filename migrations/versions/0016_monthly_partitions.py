"""tasks and ledger_entries partitioned by month on the task id

Both tables are rewritten as tables partitioned BY RANGE on the task id (`tasks.id`,
`ledger_entries.task_id`), with the same monthly bounds: the partition of month M holds the ids whose
first 48 bits (a UUIDv7's millisecond timestamp, tierbatch/base/ids.py) fall in M, so a ledger row lives
in its task's month. Made here: one partition per month from the first month of the time-ordered
(version 7) task ids already stored, at most ten years back, to the month after this one (the beat keeps
three months ahead, tierbatch/tasks/partitions.py); `<table>_from_2100` for the ids from 2100 on; and a
DEFAULT partition for every other id.

The ids already stored keep their values. Time-ordered ones (job items) land in their month. Random ones
(UUIDv4: tasks from `/v1/tasks`, the gateway, shadows) spread over the whole range: 99% of them fall after
2100 (`<table>_from_2100`), most of the rest before the first month or after the months made (the
DEFAULT), a few in a month, which keeps them as long as that month's tasks: never shorter than before.
Whenever a month's partition is made later, the DEFAULT's rows of its range are moved into it first.

A unique index of a partitioned table must contain the partition key, so:
- `pk_ledger_entries` becomes (id, task_id); `uq_ledger_entries_task_billed` (task_id) stays global.
- `uq_tasks_tenant_idempotency_key` moves to the table `task_idempotency_keys` (tenant, key) → task.
- `uq_tasks_job_item` moves to the table `job_item_ids` (job, item id): the item ids a job has taken.
- `uq_tasks_shadow_of` goes: a shadow's id is derived from its task's (same month, one per task), so the
  primary key says "at most one shadow per task"; `ix_tasks_shadow_of` stays for lookups.
- The foreign keys to `tasks` (quality_comparisons.task_id, classifications.task_id, tasks.shadow_of)
  go: dropping a month's partition would check every referring row under an exclusive lock on `tasks`
  (measured: 1.8 s for a million rows each side), and retention clears those columns itself.
  quality_comparisons.task_id becomes nullable (a comparison outlives its task).

The cost view `cost_ledger` and the rollup triggers of `ledger_entries` (0002, 0012) are taken from the
database as they are, dropped, and created again on the new table after the rows are copied (so the
copy does not add to `ledger_daily` twice). Indexes, CHECKs and foreign keys are recreated as they were,
each partition's indexes named `<index>_<partition suffix>`. The rewrite holds an exclusive lock on both
tables for its whole length (a copy of every row and every index build).

Downgrade puts back the unpartitioned tables, the unique indexes and the foreign keys (referring rows
whose task retention dropped are cleared first: comparisons deleted, classifications unlinked).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from tierbatch.base.ids import Month

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = {'tasks': 'id', 'ledger_entries': 'task_id'}
PRIMARY_KEYS = {'tasks': ('id',), 'ledger_entries': ('id', 'task_id')}
OLD_PRIMARY_KEYS = {'tasks': ('id',), 'ledger_entries': ('id',)}
FAR_MONTH = Month(2100, 1)
MONTHS_BACK = 120
REFERRING_KEYS = (  # (table, constraint, column): the foreign keys to tasks.id
    ('quality_comparisons', 'fk_quality_comparisons_task_id_tasks', 'task_id'),
    ('classifications', 'fk_classifications_task_id_tasks', 'task_id'),
    ('tasks', 'fk_tasks_shadow_of_tasks', 'shadow_of'),
)
# 0015's unique indexes of tasks (frozen): the partitioned table cannot hold them
REPLACED = {'uq_tasks_tenant_idempotency_key', 'uq_tasks_job_item', 'uq_tasks_shadow_of'}
OLD_UNIQUE = (
    'CREATE UNIQUE INDEX uq_tasks_tenant_idempotency_key ON tasks (tenant_id, idempotency_key) '
    'WHERE idempotency_key IS NOT NULL',
    'CREATE UNIQUE INDEX uq_tasks_job_item ON tasks (job_id, item_id) WHERE job_id IS NOT NULL',
    'CREATE UNIQUE INDEX uq_tasks_shadow_of ON tasks (shadow_of) WHERE shadow_of IS NOT NULL',
)
NEW_SHADOW_INDEX = 'CREATE INDEX ix_tasks_shadow_of ON tasks (shadow_of) WHERE shadow_of IS NOT NULL'


def _rows(sql: str, **params: object) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in op.get_bind().execute(sa.text(sql), params)]


def _dependents(table: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The views over `table` (name, SELECT text) and its own triggers (CREATE statements)."""
    views = [(str(name), str(definition)) for name, definition in _rows(
        "SELECT DISTINCT v.relname, pg_get_viewdef(v.oid) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
        "JOIN pg_class v ON v.oid = r.ev_class WHERE d.refobjid = CAST(:t AS regclass) AND v.oid <> d.refobjid",
        t=table)]
    triggers = [str(row[0]) for row in _rows(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = CAST(:t AS regclass) AND NOT tgisinternal "
        "ORDER BY tgname", t=table)]
    return views, triggers


def _indexes(table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of `table`'s indexes that are not its primary key; for a partitioned
    table, the statement made for a plain one (`ON ONLY` dropped)."""
    return [(str(name), str(definition).replace(' ON ONLY ', ' ON ')) for name, definition in _rows(
        "SELECT c.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
        "WHERE x.indrelid = CAST(:t AS regclass) AND NOT x.indisprimary ORDER BY c.relname", t=table)]


def _foreign_keys(table: str) -> list[tuple[str, str]]:
    return [(str(name), str(definition)) for name, definition in _rows(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = CAST(:t AS regclass) "
        "AND contype = 'f' AND conparentid = 0 ORDER BY conname", t=table)]


def _set_aside(table: str, aside: str) -> None:
    """Rename `table` to `aside` and drop its primary key and indexes, whose names the new table takes."""
    op.execute(f'ALTER TABLE {table} RENAME TO {aside}')
    for name, _ in _indexes(aside):
        op.execute(f'DROP INDEX {name}')
    op.execute(f'ALTER TABLE {aside} DROP CONSTRAINT pk_{table}')
    for name, _ in _foreign_keys(aside):
        op.execute(f'ALTER TABLE {aside} DROP CONSTRAINT {name}')


def _name_partition_indexes(partition: str, suffix: str) -> None:
    for child, parent in _rows(
            "SELECT child.relname, parent.relname FROM pg_index x JOIN pg_class child ON child.oid = x.indexrelid "
            "JOIN pg_inherits i ON i.inhrelid = child.oid JOIN pg_class parent ON parent.oid = i.inhparent "
            "WHERE x.indrelid = CAST(:p AS regclass)", p=partition):
        op.execute(f'ALTER INDEX "{child}" RENAME TO "{parent}_{suffix}"')


def _months(now: datetime) -> list[Month]:
    """From the month of the oldest time-ordered task id (at most MONTHS_BACK back) to next month."""
    current = Month.of(now)
    oldest = op.get_bind().scalar(sa.text(
        "SELECT id FROM tasks WHERE substr(id::text, 15, 1) = '7' AND id < CAST(:upper AS uuid) ORDER BY id LIMIT 1"),
        {"upper": str(current.plus(2).bound)})
    first = current if oldest is None else Month.of(datetime.fromtimestamp((oldest.int >> 80) / 1000, UTC))
    first = max(min(first, current), current.plus(-MONTHS_BACK))
    months = [first]
    while months[-1] < current.plus(1):
        months.append(months[-1].plus(1))
    return months


def _partitioned_copy(table: str, months: list[Month]) -> None:
    key, aside = KEYS[table], f'{table}_unpartitioned'
    indexes, foreign_keys = _indexes(table), _foreign_keys(table)
    _set_aside(table, aside)
    op.execute(f'CREATE TABLE {table} (LIKE {aside} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
               f'PARTITION BY RANGE ({key})')
    suffixes = []
    for month in months:
        suffix = f'{month.year:04d}_{month.month:02d}'
        op.execute(f"CREATE TABLE {table}_{suffix} PARTITION OF {table} "
                   f"FOR VALUES FROM ('{month.bound}') TO ('{month.plus(1).bound}')")
        suffixes.append(suffix)
    far = f'from_{FAR_MONTH.year}'
    op.execute(f"CREATE TABLE {table}_{far} PARTITION OF {table} FOR VALUES FROM ('{FAR_MONTH.bound}') TO (MAXVALUE)")
    op.execute(f'CREATE TABLE {table}_default PARTITION OF {table} DEFAULT')
    suffixes += [far, 'default']
    op.execute(f'INSERT INTO {table} SELECT * FROM {aside}')
    op.execute(f'ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY ({", ".join(PRIMARY_KEYS[table])})')
    for name, definition in indexes:
        if name not in REPLACED:  # unique without the partition key: see the docstring
            op.execute(definition)
    if table == 'tasks':
        op.execute(NEW_SHADOW_INDEX)
    for name, definition in foreign_keys:
        if name not in {constraint for _, constraint, _ in REFERRING_KEYS}:
            op.execute(f'ALTER TABLE {table} ADD CONSTRAINT {name} {definition}')
    for suffix in suffixes:
        _name_partition_indexes(f'{table}_{suffix}', suffix)
    if table == 'ledger_entries':
        op.execute('ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id')
    op.execute(f'DROP TABLE {aside}')


def _plain_copy(table: str) -> None:
    """The reverse of `_partitioned_copy`: an unpartitioned table with the same rows and indexes."""
    aside = f'{table}_partitioned'
    indexes, foreign_keys = _indexes(table), _foreign_keys(table)
    _set_aside(table, aside)
    op.execute(f'CREATE TABLE {table} (LIKE {aside} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
    op.execute(f'INSERT INTO {table} SELECT * FROM {aside}')
    op.execute(f'ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY ({", ".join(OLD_PRIMARY_KEYS[table])})')
    for name, definition in indexes:
        if name != 'ix_tasks_shadow_of':
            op.execute(definition)
    if table == 'tasks':
        for definition in OLD_UNIQUE:
            op.execute(definition)
    for name, definition in foreign_keys:
        op.execute(f'ALTER TABLE {table} ADD CONSTRAINT {name} {definition}')
    if table == 'ledger_entries':
        op.execute('ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id')
    op.execute(f'DROP TABLE {aside}')  # and its partitions


def _rewrite(convert: str) -> None:
    views: list[tuple[str, str]] = []
    triggers: list[str] = []
    for table in KEYS:
        table_views, table_triggers = _dependents(table)
        for name, _ in table_views:
            op.execute(f'DROP VIEW {name}')
        for statement in table_triggers:
            op.execute(f'DROP TRIGGER {statement.split()[2]} ON {table}')
        views += table_views
        triggers += table_triggers
    if convert == 'partitioned':
        now = op.get_bind().scalar(sa.text('SELECT now()'))
        months = _months(now)
        for table in ('tasks', 'ledger_entries'):
            _partitioned_copy(table, months)
    else:
        for table in ('tasks', 'ledger_entries'):
            _plain_copy(table)
    for statement in triggers:
        op.execute(statement)
    for name, definition in views:
        op.execute(f'CREATE VIEW {name} AS {definition}')
    op.execute('ANALYZE tasks')
    op.execute('ANALYZE ledger_entries')


def upgrade() -> None:
    for table, constraint, _ in REFERRING_KEYS:
        op.drop_constraint(constraint, table, type_='foreignkey')
    op.alter_column('quality_comparisons', 'task_id', nullable=True)
    _rewrite('partitioned')
    op.create_table('task_idempotency_keys',
                    sa.Column('tenant_id', sa.UUID(), nullable=False),
                    sa.Column('idempotency_key', sa.Text(), nullable=False),
                    sa.Column('task_id', sa.UUID(), nullable=False),
                    sa.PrimaryKeyConstraint('tenant_id', 'idempotency_key', name='pk_task_idempotency_keys'))
    op.execute('INSERT INTO task_idempotency_keys (tenant_id, idempotency_key, task_id) '
               'SELECT tenant_id, idempotency_key, id FROM tasks WHERE idempotency_key IS NOT NULL')
    op.create_index('ix_task_idempotency_keys_task', 'task_idempotency_keys', ['task_id'])
    op.create_table('job_item_ids',
                    sa.Column('job_id', sa.UUID(), nullable=False),
                    sa.Column('item_id', sa.Text(), nullable=False),
                    sa.PrimaryKeyConstraint('job_id', 'item_id', name='pk_job_item_ids'))
    op.execute('INSERT INTO job_item_ids (job_id, item_id) '
               'SELECT job_id, item_id FROM tasks WHERE job_id IS NOT NULL AND item_id IS NOT NULL')


def downgrade() -> None:
    # months retention dropped whose other rows were still being cleaned (tierbatch/tasks/partitions.py)
    for (name,) in _rows("SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ '^tasks_[0-9]{4}_[0-9]{2}_dropped$'"):
        op.execute(f'DROP TABLE {name}')
    op.drop_table('job_item_ids')
    op.drop_table('task_idempotency_keys')
    _rewrite('plain')
    # what referred to a task retention dropped
    op.execute('DELETE FROM quality_comparisons q WHERE q.task_id IS NULL '
               'OR NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = q.task_id)')
    op.execute('UPDATE classifications c SET task_id = NULL WHERE c.task_id IS NOT NULL '
               'AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = c.task_id)')
    op.execute('UPDATE tasks s SET shadow_of = NULL WHERE s.shadow_of IS NOT NULL '
               'AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = s.shadow_of)')
    op.alter_column('quality_comparisons', 'task_id', nullable=False)
    for table, constraint, column in REFERRING_KEYS:
        op.create_foreign_key(constraint, table, 'tasks', [column], ['id'])
