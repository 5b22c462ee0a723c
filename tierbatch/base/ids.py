"""Task ids: UUIDv7 (RFC 9562), the 48-bit Unix millisecond timestamp first, and the months they fall in.

`tasks` and `ledger_entries` are partitioned by month on the task id (tierbatch/db/partitions.py): the
partition of a month holds the ids whose first 48 bits fall in that month (its bounds are `Month.bound`,
the month's first millisecond with the other 80 bits zero), so a task's id says where its row and its
ledger rows live. Every task id is made here:

- `new_task_ids(count)`: one request's ids, in the order they are made (a job's results come out in item
  order, and the primary key takes them at its right edge): the millisecond, 12 random bits, then a
  62-bit counter from a random start. Two requests of the same millisecond collide only with the same 12
  bits and overlapping counter ranges (61 random bits): never in practice; the primary key would refuse it.
- `shadow_task_id(task_id)`: the quality monitor's shadow of a task, derived from the task's id: the same
  48-bit prefix (the same month: the two are dropped together) and 74 bits of a hash of the id, so a
  second shadow of the same task is the same primary key (at most one shadow per task). A clash with
  another task's id would need 74 bits to agree within one millisecond: never in practice.

`clock` (seconds since the epoch, `time.time` by default) is a seam: tests make ids of another month.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

Clock = Callable[[], float]

_MILLISECONDS = (1 << 48) - 1
_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_A = 0xFFF << 64  # 12 bits after the version
_RAND_B = (1 << 62) - 1  # 62 bits after the variant


def _id(milliseconds: int, rand_a: int, rand_b: int) -> uuid.UUID:
    return uuid.UUID(int=((milliseconds & _MILLISECONDS) << 80) | _VERSION_7 | ((rand_a & 0xFFF) << 64)
                     | _VARIANT | (rand_b & _RAND_B))


def new_task_ids(count: int, clock: Clock = time.time) -> list[uuid.UUID]:
    """`count` new task ids, ascending."""
    milliseconds = int(clock() * 1000)
    start = secrets.randbits(61)  # 62 bits of room below the variant: no wrap for any count we take
    rand_a = secrets.randbits(12)
    return [_id(milliseconds, rand_a, start + offset) for offset in range(count)]


def new_task_id(clock: Clock = time.time) -> uuid.UUID:
    return new_task_ids(1, clock)[0]


def shadow_task_id(task_id: uuid.UUID) -> uuid.UUID:
    """The id of the quality monitor's shadow of `task_id` (the same month, one per task)."""
    digest = int.from_bytes(hashlib.sha256(b"tierbatch shadow of " + task_id.bytes).digest()[:10], "big")
    return _id(task_id.int >> 80, digest >> 62, digest)


def id_time(task_id: uuid.UUID) -> datetime:
    """The instant in a task id's first 48 bits (for an id made before ids were time-ordered, noise)."""
    return datetime.fromtimestamp((task_id.int >> 80) / 1000, UTC)


@dataclass(frozen=True, order=True, slots=True)
class Month:
    """A calendar month in UTC; `bound` is where its partition starts."""

    year: int
    month: int

    @classmethod
    def of(cls, instant: datetime) -> Month:
        utc = instant.astimezone(UTC)
        return cls(utc.year, utc.month)

    def plus(self, months: int) -> Month:
        index = self.year * 12 + self.month - 1 + months
        return Month(index // 12, index % 12 + 1)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def bound(self) -> uuid.UUID:
        """The smallest id of the month: its first millisecond, then 80 zero bits."""
        return uuid.UUID(int=(int(self.start.timestamp() * 1000) & _MILLISECONDS) << 80)

    def __str__(self) -> str:
        return f"{self.year:04d}_{self.month:02d}"
