"""The model cooldown (circuit breaker) against an in-memory stand-in for the Redis commands it uses."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from tierbatch.base.config import ModelRef
from tierbatch.providers.cooldown import CircuitState, Cooldown, CooldownPolicy

PRIMARY = ModelRef(provider="sim", model="gpt-4o")
FALLBACK = ModelRef(provider="sim", model="gpt-4.1")
CHAIN = [PRIMARY, FALLBACK]


class FakeRedis:
    """The subset of redis.asyncio.Redis the cooldown uses, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.data: dict[str, tuple[str, float | None]] = {}
        self.commands = 0
        self.down = False

    def _live(self, key: str) -> str | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= self.now:
            del self.data[key]
            return None
        return value

    def _count(self) -> None:
        if self.down:
            raise RedisConnectionError("redis is down")
        self.commands += 1

    async def mget(self, keys: Sequence[str]) -> list[str | None]:
        self._count()
        return [self._live(k) for k in keys]

    async def set(self, key: str, value: str, nx: bool = False, ex: int | None = None) -> bool | None:
        self._count()
        return self._set(key, value, nx, ex)

    def _set(self, key: str, value: str, nx: bool = False, ex: int | None = None) -> bool | None:
        if nx and self._live(key) is not None:
            return None
        self.data[key] = (value, self.now + ex if ex else None)
        return True

    async def incr(self, key: str) -> int:
        self._count()
        return self._incr(key)

    def _incr(self, key: str) -> int:
        current = self._live(key)
        expires = self.data[key][1] if current is not None else None
        value = int(current or 0) + 1
        self.data[key] = (str(value), expires)
        return value

    def _expire(self, key: str, seconds: int, nx: bool = False) -> bool:
        if self._live(key) is None:
            return False
        value, expires = self.data[key]
        if nx and expires is not None:
            return False
        self.data[key] = (value, self.now + seconds)
        return True

    async def exists(self, key: str) -> int:
        self._count()
        return int(self._live(key) is not None)

    async def delete(self, *keys: str) -> int:
        self._count()
        return self._delete(*keys)

    def _delete(self, *keys: str) -> int:
        return sum(1 for k in keys if self.data.pop(k, None) is not None)

    def _pttl(self, key: str) -> int:
        if self._live(key) is None:
            return -2
        expires = self.data[key][1]
        return -1 if expires is None else int((expires - self.now) * 1000)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.calls: list[Any] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def incr(self, key: str) -> None:
        self.calls.append(lambda: self.redis._incr(key))

    def expire(self, key: str, seconds: int, nx: bool = False) -> None:
        self.calls.append(lambda: self.redis._expire(key, seconds, nx))

    def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.calls.append(lambda: self.redis._set(key, value, ex=ex))

    def delete(self, *keys: str) -> None:
        self.calls.append(lambda: self.redis._delete(*keys))

    def pttl(self, key: str) -> None:
        self.calls.append(lambda: self.redis._pttl(key))

    async def execute(self) -> list[Any]:
        self.redis._count()
        return [call() for call in self.calls]


def make(policy: CooldownPolicy | None = None) -> tuple[Cooldown, FakeRedis]:
    fake = FakeRedis()
    policy = policy or CooldownPolicy(failure_threshold=3, window_seconds=30, base_cooldown_seconds=5,
                                      max_cooldown_seconds=40)
    return Cooldown(fake, "t:", policy, clock=lambda: fake.now), fake  # type: ignore[arg-type]


def allowed(cooldown: Cooldown) -> list[tuple[str, bool, bool]]:
    return [(a.ref.model, a.allowed, a.probe) for a in asyncio.run(cooldown.admit(CHAIN))]


def fail(cooldown: Cooldown, ref: ModelRef = PRIMARY, **kwargs: Any) -> bool:
    async def go() -> bool:
        admission = next(a for a in await cooldown.admit(CHAIN) if a.ref == ref)
        return await cooldown.record_failure(admission, **kwargs)

    return asyncio.run(go())


def test_a_model_trips_after_the_threshold_and_is_skipped_while_it_cools_down() -> None:
    cooldown, _fake = make()
    assert fail(cooldown) is False and fail(cooldown) is False
    assert allowed(cooldown) == [("gpt-4o", True, False), ("gpt-4.1", True, False)]
    assert fail(cooldown) is True  # the third failure in the window
    assert allowed(cooldown) == [("gpt-4o", False, False), ("gpt-4.1", True, False)]
    assert asyncio.run(cooldown.state(PRIMARY)) is CircuitState.OPEN
    assert asyncio.run(cooldown.retry_after(CHAIN)) == 5.0


def test_failures_outside_the_window_do_not_add_up() -> None:
    cooldown, fake = make()
    fail(cooldown)
    fail(cooldown)
    fake.now += 31
    assert fail(cooldown) is False
    assert asyncio.run(cooldown.state(PRIMARY)) is CircuitState.CLOSED


def test_after_the_cooldown_exactly_one_probe_goes_through_and_its_success_closes_the_circuit() -> None:
    cooldown, fake = make()
    for _ in range(3):
        fail(cooldown)
    fake.now += 5
    assert asyncio.run(cooldown.state(PRIMARY)) is CircuitState.HALF_OPEN

    async def probe_then_others() -> None:
        first = await cooldown.admit(CHAIN)
        second = await cooldown.admit(CHAIN)
        assert (first[0].allowed, first[0].probe) == (True, True)
        assert (second[0].allowed, second[0].probe) == (False, False)  # another caller keeps skipping it
        await cooldown.record_success(first[0])

    asyncio.run(probe_then_others())
    assert asyncio.run(cooldown.state(PRIMARY)) is CircuitState.CLOSED
    assert allowed(cooldown) == [("gpt-4o", True, False), ("gpt-4.1", True, False)]
    assert not any(k.startswith("t:tierbatch:cooldown:") for k in fake.data)


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_maximum() -> None:
    cooldown, fake = make()
    for _ in range(3):
        fail(cooldown)
    waits = []
    for _ in range(4):
        fake.now += 100
        assert fail(cooldown) is True  # the probe failed
        waits.append(asyncio.run(cooldown.retry_after(CHAIN)))
    assert waits == [10.0, 20.0, 40.0, 40.0]


def test_a_success_on_a_healthy_model_costs_no_write() -> None:
    cooldown, fake = make()

    async def call() -> None:
        admissions = await cooldown.admit(CHAIN)
        await cooldown.record_success(admissions[0])

    asyncio.run(call())
    assert fake.commands == 1  # the MGET
    asyncio.run(call())
    assert fake.commands == 1  # within local_ttl, this process's memory answers
    fake.now += 1
    asyncio.run(call())
    assert fake.commands == 2


def test_another_process_sees_a_trip_within_the_local_ttl() -> None:
    here, fake = make()
    there = Cooldown(fake, "t:", here.policy, clock=lambda: fake.now)  # type: ignore[arg-type]
    assert allowed(there)[0] == ("gpt-4o", True, False)  # remembered as healthy
    for _ in range(3):
        fail(here)
    assert allowed(here)[0] == ("gpt-4o", False, False)  # the process that tripped it knows at once
    assert allowed(there)[0] == ("gpt-4o", True, False)  # the other one still trusts its memory...
    fake.now += 1
    assert allowed(there)[0] == ("gpt-4o", False, False)  # ...for at most local_ttl


def test_a_rate_limit_opens_the_circuit_for_its_retry_after() -> None:
    cooldown, _fake = make()
    assert fail(cooldown, rate_limited=True, retry_after=12.0) is True
    assert asyncio.run(cooldown.retry_after(CHAIN)) == 12.0
    assert fail(cooldown, FALLBACK, rate_limited=True, retry_after=1000.0) is True
    assert asyncio.run(cooldown.retry_after([FALLBACK])) == 120.0  # capped
    assert allowed(cooldown) == [("gpt-4o", False, False), ("gpt-4.1", False, False)]


def test_concurrent_failures_past_the_threshold_trip_once() -> None:
    cooldown, fake = make()

    async def many() -> None:
        admissions = [(await cooldown.admit(CHAIN))[0] for _ in range(6)]
        for admission in admissions:
            await cooldown.record_failure(admission)

    asyncio.run(many())
    fake.now += 5  # the first cooldown (5 s), not a compounded one
    assert asyncio.run(cooldown.state(PRIMARY)) is CircuitState.HALF_OPEN


def test_without_redis_every_model_is_allowed() -> None:
    cooldown, fake = make()
    fake.down = True
    assert allowed(cooldown) == [("gpt-4o", True, False), ("gpt-4.1", True, False)]
    assert fail(cooldown) is False
