"""The monthly partitions of `tasks` and `ledger_entries`: their names, bounds, and the DDL that makes and
drops them (the rules of when: tierbatch/tasks/partitions.py).

Both tables are partitioned BY RANGE on the task id (`tasks.id`, `ledger_entries.task_id`), with the same
bounds, so a ledger row lives in its task's month. Task ids are UUIDv7 (tierbatch/base/ids.py): the
partition of month M holds the ids from `M.bound` (M's first millisecond, 80 zero bits) to the next
month's. Besides the months:

- `<table>_from_2100`: ids from 2100 on. Ids made before ids were time-ordered (UUIDv4, migration 0016)
  spread over the whole range, and 99% of them fall after 2100: this partition keeps them out of the
  DEFAULT, which every new month's ATTACH scans.
- `<table>_default`: the DEFAULT partition, every id no other partition takes: the rest of the old random
  ids (about 1.5% of them), and an id of a month that has no partition (yet, or any more).

Making a month's partition (`create_month_partition`) does not take the exclusive lock that `CREATE TABLE
... PARTITION OF` takes on the parent: the table is created beside it (LIKE), the rows of its range are
moved out of the DEFAULT into it (straight from partition to partition, so no statement trigger of the
parent fires: `ledger_daily` is not touched twice), then it is attached (SHARE UPDATE EXCLUSIVE on the
parent; ACCESS EXCLUSIVE on the DEFAULT, which it scans, and on the new table, which a CHECK spares from
the scan). Dropping one (`drop_partition`) is a DROP TABLE of the attached partition: ACCESS EXCLUSIVE
on the parent and the DEFAULT for a moment, and no lock on the tables its foreign keys name (a DETACH
first would lock them, and DETACH ... CONCURRENTLY is refused while a DEFAULT partition exists). The
caller sets `lock_timeout` and commits; nothing here commits.

A partition's indexes are named after the parent's, `<parent index>_<suffix>` (`ix_tasks_live_2026_08`),
so plans and tests read the same names on every partition.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from tierbatch.base.ids import Month, id_time

# parent table -> its partition key column
PARTITIONED = {"tasks": "id", "ledger_entries": "task_id"}
# the first month of `<table>_from_2100`
FAR_MONTH = Month(2100, 1)
DEFAULT_SUFFIX = "default"
FAR_SUFFIX = f"from_{FAR_MONTH.year}"
# a dropped month of `tasks` whose rows in other tables are not cleaned yet: this table says so and holds
# the job item ids to give back (tierbatch/tasks/partitions.py)
DROPPED_SUFFIX = "dropped"

_NAME = re.compile(rf"^(?:{'|'.join(PARTITIONED)})_"
                   rf"(?:\d{{4}}_\d{{2}}(?:_{DROPPED_SUFFIX})?|{FAR_SUFFIX}|{DEFAULT_SUFFIX})$")
_BOUND = re.compile(r"^FOR VALUES FROM \((MINVALUE|'[0-9a-f-]{36}')\) TO \((MAXVALUE|'[0-9a-f-]{36}')\)$")
_MAX_IDENTIFIER = 63


def month_partition(parent: str, month: Month) -> str:
    return f"{parent}_{month}"


def default_partition(parent: str) -> str:
    return f"{parent}_{DEFAULT_SUFFIX}"


def far_partition(parent: str) -> str:
    return f"{parent}_{FAR_SUFFIX}"


def dropped_marker(month: Month) -> str:
    return f"tasks_{month}_{DROPPED_SUFFIX}"


def is_partition_table(name: str) -> bool:
    """A partition of a partitioned table, or a dropped month's marker: tables the models do not
    declare (Alembic's autogenerate leaves them alone)."""
    return _NAME.match(name) is not None


def autogenerate_includes(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name`: the models declare the partitioned tables, not their partitions."""
    return not (type_ == "table" and name is not None and is_partition_table(name))


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    lower: uuid.UUID | None  # None: MINVALUE (or the DEFAULT)
    upper: uuid.UUID | None  # None: MAXVALUE (or the DEFAULT)
    is_default: bool = False

    @property
    def month(self) -> Month | None:
        """The month a partition's bounds are exactly, else None (the DEFAULT, `from_2100`)."""
        if self.lower is None or self.upper is None:
            return None
        month = Month.of(id_time(self.lower))
        return month if (month.bound, month.plus(1).bound) == (self.lower, self.upper) else None


_LOWEST, _HIGHEST = uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1)


def _month_of(task_id: uuid.UUID) -> Month | None:
    try:
        return Month.of(id_time(task_id))
    except (OverflowError, ValueError, OSError):  # an old random id past the calendar's range
        return None


def months_spanned(ids: Iterable[uuid.UUID]) -> dict[str, uuid.UUID]:
    """`months_from` and `months_to`: the bounds of the months from the smallest id's to the largest's, as
    the parameters of `t.id >= :months_from AND t.id < :months_to`. A statement that joins `tasks` on its id
    to a temp table or an array cannot be pruned by the join, and the planner costs a probe of every
    partition per row (it does not count the pruning at run time): with this range it plans over those
    months' partitions only. Whole months, not the ids' own range, so that it is no narrower an index
    range than the partitions themselves. Old random ids spread it over every partition. The statement's
    transaction calls `plan_for_the_values` first."""
    listed = ids if isinstance(ids, Collection) else list(ids)
    if not listed:
        return {"months_from": _LOWEST, "months_to": _LOWEST}
    first, last = _month_of(min(listed)), _month_of(max(listed))
    upper = None if last is None else last.plus(1)
    return {"months_from": _LOWEST if first is None else first.bound,
            "months_to": _HIGHEST if upper is None or upper.year > 9999 else upper.bound}


# The range's values decide the plan: a generic plan (what Postgres may settle on for a statement that
# psycopg prepared after a few executions on one connection) estimates `id >= $1 AND id < $2` at 0.5% of
# the table and reads the whole months through the primary key for every chunk, the more the fuller they
# are. Planning a bulk statement for its values costs a few milliseconds.
_PLAN_FOR_THE_VALUES = text("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")


def plan_for_the_values(connection: Connection | Session) -> None:
    """For the rest of the current transaction, plan every statement for its parameters' values (a
    statement bounded by `months_spanned` must be: see above). Doesn't commit."""
    connection.execute(_PLAN_FOR_THE_VALUES)


def _bound(value: str) -> uuid.UUID | None:
    return None if value in ("MINVALUE", "MAXVALUE") else uuid.UUID(value.strip("'"))


def partitions(connection: Connection, parent: str) -> list[Partition]:
    """The partitions of `parent`, in bound order (the DEFAULT last)."""
    rows = connection.execute(text(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = CAST(:parent AS regclass)"),
        {"parent": parent}).all()
    found: list[Partition] = []
    for name, bound in rows:
        if bound == "DEFAULT":
            found.append(Partition(name, None, None, is_default=True))
            continue
        match = _BOUND.match(bound)
        if match is None:
            raise ValueError(f"{name}: a partition bound this module does not make: {bound}")
        found.append(Partition(name, _bound(match.group(1)), _bound(match.group(2))))
    return sorted(found, key=lambda p: (p.is_default, p.lower is not None, p.lower or uuid.UUID(int=0)))


def _columns(connection: Connection, table: str) -> str:
    names = connection.scalars(text(
        "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = CAST(:table AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum"), {"table": table}).all()
    return ", ".join(names)


def name_partition_indexes(connection: Connection, partition: str, suffix: str) -> None:
    """Give the partition's indexes their parent's names with `_<suffix>` (a name already taken, by a
    table being dropped, is left as Postgres made it)."""
    rows = connection.execute(text(
        "SELECT child.relname, parent.relname FROM pg_index x JOIN pg_class child ON child.oid = x.indexrelid "
        "JOIN pg_inherits i ON i.inhrelid = child.oid JOIN pg_class parent ON parent.oid = i.inhparent "
        "WHERE x.indrelid = CAST(:partition AS regclass)"), {"partition": partition}).all()
    for current, parent_index in rows:
        wanted = f"{parent_index}_{suffix}"
        if current == wanted or len(wanted) > _MAX_IDENTIFIER:
            continue
        taken = connection.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": wanted})
        if not taken:
            connection.execute(text(f'ALTER INDEX "{current}" RENAME TO "{wanted}"'))


def create_month_partition(connection: Connection, parent: str, month: Month) -> int:
    """Make and attach `parent`'s partition of `month`, first moving the rows of its range out of the
    DEFAULT partition into it; returns how many rows moved. The caller has checked no partition covers
    the month (ATTACH refuses an overlap)."""
    key = PARTITIONED[parent]
    name, default = month_partition(parent, month), default_partition(parent)
    lower, upper = str(month.bound), str(month.plus(1).bound)
    connection.execute(text(f"LOCK TABLE {parent} IN SHARE UPDATE EXCLUSIVE MODE"))
    connection.execute(text(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE"))
    connection.execute(text(f"CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    # the partition's own bound as a CHECK: ATTACH then need not scan the new table (dropped after)
    connection.execute(text(f"ALTER TABLE {name} ADD CONSTRAINT {name}_bound "
                            f"CHECK ({key} >= '{lower}' AND {key} < '{upper}')"))
    columns = _columns(connection, parent)
    moved = connection.execute(text(
        f"WITH moved AS (DELETE FROM {default} WHERE {key} >= '{lower}' AND {key} < '{upper}' RETURNING {columns}) "
        f"INSERT INTO {name} ({columns}) SELECT {columns} FROM moved"))
    connection.execute(text(f"ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ('{lower}') TO ('{upper}')"))
    connection.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bound"))
    name_partition_indexes(connection, name, str(month))
    return int(getattr(moved, "rowcount", 0) or 0)


def lock_exclusively(connection: Connection, parent: str) -> None:
    """ACCESS EXCLUSIVE on `parent` until commit: what dropping one of its partitions takes; the caller
    checks the partition may still go once nothing else can write to it."""
    connection.execute(text(f"LOCK TABLE {parent} IN ACCESS EXCLUSIVE MODE"))


def drop_partition(connection: Connection, name: str) -> None:
    """DROP TABLE of an attached partition, under `lock_exclusively` of its parent."""
    connection.execute(text(f'DROP TABLE "{name}"'))
