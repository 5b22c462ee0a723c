"""The key authenticator's cache and revocation counter, the rate-limit arithmetic, secret comparison and the
admin token's minimum length. Seams: an injected key lookup, a Redis stand-in for the counter, and `limits`'
in-memory storage (same sliding-window algorithm as its Redis one)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from ipaddress import ip_network
from pathlib import Path
from typing import Any, TypeVar

import pytest
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from tierbatch.base.errors import RateLimited, Unauthenticated
from tierbatch.base.settings import MIN_ADMIN_TOKEN_CHARS, Settings
from tierbatch.cli.stack.local_stack import LocalStack, StackError
from tierbatch.tenants.auth import KeyAuthenticator, RateLimits, estimated_tokens, secret_matches, sliding_window_wait
from tierbatch.tenants.store import KeyGrant

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await awaitable

    return asyncio.run(wrapper())


class FakeRedis:
    """The revocation counter: `get` only, and it can be made unreachable."""

    def __init__(self) -> None:
        self.generation: bytes | None = None
        self.down = False
        self.reads = 0

    async def get(self, _key: str) -> bytes | None:
        self.reads += 1
        if self.down:
            raise RedisConnectionError("connection refused")
        return self.generation


class Keys:
    """The database, as the authenticator sees it: key -> grant, with a count of lookups."""

    def __init__(self) -> None:
        self.grants: dict[str, KeyGrant] = {}
        self.lookups = 0

    def add(self, key: str, rpm: int | None = None, tpm: int | None = None) -> KeyGrant:
        grant = KeyGrant(uuid.uuid4(), uuid.uuid4(), rpm, tpm)
        self.grants[key] = grant
        return grant

    def __call__(self, key: str) -> KeyGrant | None:
        self.lookups += 1
        return self.grants.get(key)


def authenticator(keys: Keys, redis: FakeRedis, failed_per_minute: int = 20, **options: Any) -> KeyAuthenticator:
    return KeyAuthenticator(keys, redis, "p:", RateLimits(MemoryStorage()), failed_per_minute,  # type: ignore[arg-type]
                            **options)


def test_a_valid_key_is_looked_up_once_then_remembered() -> None:
    keys, redis = Keys(), FakeRedis()
    grant = keys.add("tb_good")
    auth = authenticator(keys, redis, generation_check_seconds=0.0)

    async def scenario() -> None:
        for _ in range(5):
            assert await auth.grant("tb_good", "10.0.0.1") == grant

    run(scenario())
    assert keys.lookups == 1 and redis.reads == 5


def test_a_moved_generation_forgets_every_remembered_key() -> None:
    keys, redis = Keys(), FakeRedis()
    keys.add("tb_good")
    auth = authenticator(keys, redis, generation_check_seconds=0.0)

    async def scenario() -> None:
        await auth.grant("tb_good", "10.0.0.1")
        del keys.grants["tb_good"]  # revoked in the database...
        assert await auth.grant("tb_good", "10.0.0.1")  # ...still remembered: nobody said so yet
        redis.generation = b"1"  # ...then announced
        with pytest.raises(Unauthenticated):
            await auth.grant("tb_good", "10.0.0.1")

    run(scenario())
    assert keys.lookups == 2


def test_the_generation_is_read_at_most_once_per_interval() -> None:
    keys, redis = Keys(), FakeRedis()
    keys.add("tb_good")
    auth = authenticator(keys, redis, generation_check_seconds=3600.0)

    async def scenario() -> None:
        for _ in range(50):
            await auth.grant("tb_good", "10.0.0.1")

    run(scenario())
    assert redis.reads == 1 and keys.lookups == 1


def test_without_redis_every_call_asks_the_database() -> None:
    keys, redis = Keys(), FakeRedis()
    keys.add("tb_good")
    redis.down = True
    auth = authenticator(keys, redis, generation_check_seconds=0.0)

    async def scenario() -> None:
        for _ in range(3):
            await auth.grant("tb_good", "10.0.0.1")
        del keys.grants["tb_good"]
        with pytest.raises(Unauthenticated):
            await auth.grant("tb_good", "10.0.0.1")  # refused at once: nothing was remembered

    run(scenario())
    assert keys.lookups == 4


def test_a_bad_key_is_remembered_and_failures_are_limited_per_address() -> None:
    keys, redis = Keys(), FakeRedis()
    keys.add("tb_good")
    auth = authenticator(keys, redis, failed_per_minute=3, generation_check_seconds=3600.0)

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await auth.grant("tb_wrong", "10.0.0.1")
        with pytest.raises(RateLimited) as limited:
            await auth.grant("tb_wrong", "10.0.0.1")
        assert limited.value.kind == "failed_authentications" and 1 <= limited.value.retry_after <= 120
        with pytest.raises(Unauthenticated):  # another address is not affected
            await auth.grant("tb_wrong", "10.0.0.2")
        # a right key still passes from the limited address: guesses cannot lock its users out
        assert await auth.grant("tb_good", "10.0.0.1") == keys.grants["tb_good"]

    run(scenario())
    assert keys.lookups == 2  # one lookup of the wrong key (then the negative cache answered), one of the good


@pytest.mark.parametrize("key", ["x" * 257, "tb_" + "é" * 300])
def test_an_overlong_key_is_refused_without_a_lookup(key: str) -> None:
    keys, redis = Keys(), FakeRedis()
    auth = authenticator(keys, redis)
    with pytest.raises(Unauthenticated):
        run(auth.grant(key, "10.0.0.1"))
    assert keys.lookups == 0


def test_the_admin_token_is_compared_and_its_failures_counted() -> None:
    auth = authenticator(Keys(), FakeRedis(), failed_per_minute=2)
    token = "a" * 40

    async def scenario() -> None:
        await auth.check_admin(token, token, "10.0.0.1")
        for wrong in ("é" * 40, token):
            with pytest.raises(Unauthenticated):
                await auth.check_admin(wrong, "b" * 40, "10.0.0.1")
        with pytest.raises(RateLimited):  # a third wrong token from that address
            await auth.check_admin("c" * 40, token, "10.0.0.1")
        await auth.check_admin(token, token, "10.0.0.1")  # the right one still passes there
        with pytest.raises(Unauthenticated):  # no admin token configured: admin routes are off
            await auth.check_admin("", "", "10.0.0.3")

    run(scenario())


@pytest.mark.parametrize(("presented", "expected", "equal"), [
    ("secret", "secret", True), ("secret", "secreT", False), ("sécret", "secret", False),
    ("\xff\xfe", "secret", False), ("", "secret", False), ("s" * 10_000, "secret", False),
    ("\ud800", "secret", False),  # a lone surrogate (JSON can carry one) is not an error either
])
def test_secrets_are_compared_as_bytes(presented: str, expected: str, equal: bool) -> None:
    assert secret_matches(presented, expected) is equal


def test_requests_and_tokens_per_minute() -> None:
    limits = RateLimits(MemoryStorage())
    grant = KeyGrant(uuid.uuid4(), uuid.uuid4(), 2, 100)
    unlimited = KeyGrant(uuid.uuid4(), uuid.uuid4(), None, None)

    async def scenario() -> None:
        await limits.admit_request(grant)
        await limits.admit_request(grant)
        with pytest.raises(RateLimited) as refused:
            await limits.admit_request(grant)
        assert refused.value.kind == "requests"
        # two requests in the current window: one more fits once it has rolled over (within 60 s) and then
        # decayed by half (30 s more)
        assert 30 <= refused.value.retry_after <= 90
        await limits.admit_tokens(grant, 60)
        with pytest.raises(RateLimited) as over:
            await limits.admit_tokens(grant, 60)
        assert over.value.kind == "tokens"
        with pytest.raises(RateLimited, match="Request too large"):
            await limits.admit_tokens(grant, 101)
        for _ in range(1000):
            await limits.admit_request(unlimited)
            await limits.admit_tokens(unlimited, 10**9)

    run(scenario())


def test_the_limit_is_shared_by_every_limiter_on_one_storage() -> None:
    storage = MemoryStorage()
    first, second = RateLimits(storage), RateLimits(storage)  # two API processes, one Redis
    grant = KeyGrant(uuid.uuid4(), uuid.uuid4(), 3, None)

    async def scenario() -> None:
        await first.admit_request(grant)
        await second.admit_request(grant)
        await first.admit_request(grant)
        with pytest.raises(RateLimited):
            await second.admit_request(grant)

    run(scenario())


@pytest.mark.parametrize(("window", "limit", "cost", "expected"), [
    ((0, 0.0, 2, 120.0), 2, 1, 90.0),  # fresh window with 2 of 2: half of it must decay after the roll
    ((0, 0.0, 60, 120.0), 100, 60, 80.0),
    ((10, 30.0, 0, 0.0), 10, 1, 0.0),  # only a previous window, half decayed: 5 + 1 fits now
    ((10, 60.0, 0, 0.0), 10, 1, 6.0),  # ...not decayed at all: 10 * (60 - t)/60 + 1 <= 10 at 6 s
    ((4, 60.0, 6, 90.0), 10, 1, 15.0),  # 4 * (60 - t)/60 + 6 + 1 <= 10 at t = 15, before the roll at 30
    ((10, 60.0, 9, 70.0), 10, 1, 10.0),  # the previous window would take 60 s; the roll, in 10 s, frees it
])
def test_sliding_window_wait(window: tuple[int, float, int, float], limit: int, cost: int, expected: float) -> None:
    assert sliding_window_wait(*window, 60.0, limit, cost) == pytest.approx(expected)


def test_sliding_window_wait_is_the_first_moment_the_cost_fits() -> None:
    """After the computed wait the cost fits under the weighted count; a second before it, it does not."""
    item = RateLimitItemPerMinute(10)
    for previous, previous_ttl, current, current_ttl, cost in [(4, 60.0, 6, 90.0, 1), (10, 60.0, 9, 70.0, 1),
                                                               (0, 0.0, 8, 100.0, 3), (7, 20.0, 5, 110.0, 4)]:
        wait = sliding_window_wait(previous, previous_ttl, current, current_ttl, 60.0, item.amount, cost)

        def weighted(t: float, p: int = previous, pt: float = previous_ttl, c: int = current,
                     ct: float = current_ttl) -> float:
            roll = ct - 60.0
            if t < roll:
                return p * max(0.0, pt - t) / 60.0 + c
            return c * max(0.0, 60.0 - (t - roll)) / 60.0

        assert weighted(wait + 1e-6) + cost <= item.amount + 1e-9
        assert wait < 1 or weighted(wait - 1) + cost > item.amount


def test_estimated_tokens() -> None:
    assert [estimated_tokens(n) for n in (0, 1, 4, 5, 400)] == [1, 1, 1, 2, 100]


def test_settings_refuse_a_short_admin_token_without_repeating_it() -> None:
    short = "s3cr3t-but-short"
    with pytest.raises(ValidationError) as refused:
        Settings(TIERBATCH_ADMIN_TOKEN=short)  # type: ignore[call-arg]
    assert f"at least {MIN_ADMIN_TOKEN_CHARS}" in str(refused.value) and short not in str(refused.value)
    assert Settings(TIERBATCH_ADMIN_TOKEN="").admin_token == ""  # type: ignore[call-arg]  # admin routes off
    token = "t" * MIN_ADMIN_TOKEN_CHARS
    assert Settings(TIERBATCH_ADMIN_TOKEN=token).admin_token == token  # type: ignore[call-arg]


def test_up_generates_a_long_admin_token_and_refuses_a_short_one(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "state", environ={})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin_token").write_text("left-by-an-old-version\n")  # too short to keep
    token = stack._admin_token()
    assert len(token) >= MIN_ADMIN_TOKEN_CHARS and token != "left-by-an-old-version"
    assert (tmp_path / "state" / "admin_token").read_text().strip() == token
    assert stack._admin_token() == token  # kept across starts
    with pytest.raises(StackError, match=f"at least {MIN_ADMIN_TOKEN_CHARS}"):
        LocalStack(tmp_path / "other", environ={"TIERBATCH_ADMIN_TOKEN": "x" * 31})._admin_token()


class UnreachableStorage(MemoryStorage):
    """`limits`' storage while Redis is down."""

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        raise RedisConnectionError("connection refused")

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        raise RedisConnectionError("connection refused")


def test_without_redis_limited_tenants_are_refused_and_failures_go_uncounted() -> None:
    keys, redis = Keys(), FakeRedis()
    redis.down = True
    limits = RateLimits(UnreachableStorage())
    auth = KeyAuthenticator(keys, redis, "p:", limits, 1)  # type: ignore[arg-type]
    grant = keys.add("tb_good", rpm=10)

    async def scenario() -> None:
        for _ in range(3):  # over the limit of 1, yet a plain 401: the counter cannot be read
            with pytest.raises(Unauthenticated):
                await auth.grant("tb_wrong", "10.0.0.1")
        assert await auth.grant("tb_good", "10.0.0.1") == grant
        with pytest.raises(RedisConnectionError):  # never admitted unmetered
            await limits.admit_request(grant)
        await limits.admit_request(keys.add("tb_free"))  # no limit: no Redis needed

    run(scenario())


def test_failures_from_exempt_networks_are_never_limited() -> None:
    keys, redis = Keys(), FakeRedis()
    auth = authenticator(keys, redis, failed_per_minute=2, generation_check_seconds=3600.0,
                         exempt_networks=[ip_network("127.0.0.0/8"), ip_network("::1/128")])

    async def scenario() -> None:
        for _ in range(5):
            with pytest.raises(Unauthenticated):
                await auth.grant("tb_wrong", "127.0.0.1")
            with pytest.raises(Unauthenticated):
                await auth.grant("tb_wrong", "::1")
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                await auth.grant("tb_wrong", "192.0.2.7")
        with pytest.raises(RateLimited):  # a counted address is still limited
            await auth.grant("tb_wrong", "192.0.2.7")

    run(scenario())
