"""Task ids (UUIDv7) and the monthly partition bounds they fall between."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from tierbatch.base.ids import Month, id_time, new_task_id, new_task_ids, shadow_task_id
from tierbatch.db.partitions import Partition, is_partition_table, months_spanned
from tierbatch.tasks.partitions import covered

DECEMBER_2026 = uuid.UUID("01a22ee6-b000-0000-0000-000000000000")  # 2026-12-01T00:00:00Z = 1796083200000 ms
JANUARY_2027 = uuid.UUID("01a2ce8b-d400-0000-0000-000000000000")  # 2027-01-01T00:00:00Z = 1798761600000 ms


def at(instant: datetime) -> float:
    return instant.timestamp()


def test_ids_are_unique_time_ordered_uuid7() -> None:
    first = new_task_ids(5000, clock=lambda: 1_800_000_000.0)
    second = new_task_ids(10, clock=lambda: 1_800_000_000.002)
    assert len(set(first)) == 5000 and first == sorted(first)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in (*first, *second))
    assert max(first) < min(second)
    assert {i.int >> 80 for i in first} == {1_800_000_000_000}  # the clock's millisecond, first 48 bits
    assert id_time(first[0]) == datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
    # two requests in the same millisecond do not meet
    again = new_task_ids(5000, clock=lambda: 1_800_000_000.0)
    assert not set(first) & set(again)


def test_month_bounds_are_the_first_millisecond_and_every_id_of_the_month_falls_between_them() -> None:
    december = Month(2026, 12)
    assert december.bound == DECEMBER_2026 and december.plus(1).bound == JANUARY_2027
    assert str(december) == "2026_12" and december.plus(1) == Month(2027, 1) and december.plus(-12) == Month(2025, 12)
    first = datetime(2026, 12, 1, tzinfo=UTC)
    last = datetime(2027, 1, 1, tzinfo=UTC) - timedelta(milliseconds=1)
    for instant in (first, first + timedelta(days=17, hours=5), last):
        task_id = new_task_id(clock=lambda instant=instant: at(instant))
        assert DECEMBER_2026 <= task_id < JANUARY_2027, instant
        assert shadow_task_id(task_id) >= DECEMBER_2026 and shadow_task_id(task_id) < JANUARY_2027
    assert new_task_id(clock=lambda: at(last + timedelta(milliseconds=1))) >= JANUARY_2027
    # the month of an instant is taken in UTC
    assert Month.of(datetime(2027, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))) == december


def test_a_shadow_id_is_derived_from_its_task_and_shares_its_prefix() -> None:
    task_id, other = new_task_ids(2)
    shadow = shadow_task_id(task_id)
    assert shadow == shadow_task_id(task_id) != task_id  # the same shadow id every time: one per task
    assert shadow != shadow_task_id(other)
    assert shadow.int >> 80 == task_id.int >> 80
    assert shadow.version == 7 and shadow.variant == uuid.RFC_4122
    legacy = uuid.UUID("9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f")  # an id from before ids were time-ordered
    assert shadow_task_id(legacy).int >> 80 == legacy.int >> 80


def test_a_month_is_covered_by_any_partition_overlapping_it_but_the_default() -> None:
    december, january = Month(2026, 12), Month(2027, 1)
    existing = [Partition("tasks_2026_12", december.bound, january.bound),
                Partition("tasks_from_2100", Month(2100, 1).bound, None),
                Partition("tasks_default", None, None, is_default=True)]
    assert covered(existing, december)
    assert not covered(existing, january) and not covered(existing, Month(2099, 12))
    assert covered(existing, Month(2100, 1)) and covered(existing, Month(2150, 6))
    assert [p.month for p in existing] == [december, None, None]
    assert Partition("odd", december.bound, Month(2027, 2).bound).month is None  # two months: not a month's


def test_partition_tables_are_told_from_the_models_tables() -> None:
    for name in ("tasks_2026_12", "ledger_entries_2027_01", "tasks_default", "ledger_entries_from_2100",
                 "tasks_2026_09_dropped"):
        assert is_partition_table(name), name
    for name in ("tasks", "ledger_entries", "ledger_daily", "job_item_ids", "task_idempotency_keys", "tasks_old"):
        assert not is_partition_table(name), name


def test_the_months_spanned_by_ids_bound_a_range_on_the_partition_key() -> None:
    in_december = new_task_ids(2, clock=lambda: at(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)))
    in_january = new_task_ids(1, clock=lambda: at(datetime(2027, 1, 2, tzinfo=UTC)))
    assert months_spanned(in_december) == {"months_from": DECEMBER_2026, "months_to": JANUARY_2027}
    assert months_spanned([*in_january, *in_december]) == {
        "months_from": DECEMBER_2026, "months_to": uuid.UUID("01a36e30-f800-0000-0000-000000000000")}  # February
    # an old random id beyond the calendar widens the range to every id
    legacy = uuid.UUID("fe1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f")
    assert months_spanned([*in_december, legacy]) == {"months_from": DECEMBER_2026,
                                                      "months_to": uuid.UUID(int=(1 << 128) - 1)}
    assert months_spanned([]) == {"months_from": uuid.UUID(int=0), "months_to": uuid.UUID(int=0)}
