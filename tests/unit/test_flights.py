"""`SingleFlight`: concurrent callers for one key share one call (its result or its error), a cancelled
caller does not cancel the others' answer, and the next caller after it ends (or after `forget`) starts a
new call. Then the two caches built on it, through their seams: concurrent requests for one API key
make one key lookup; concurrent calls of one tenant make one policy lookup."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from limits.aio.storage import MemoryStorage

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.flights import SingleFlight
from tierbatch.gateway.policies import TenantPolicies, TenantPolicy
from tierbatch.tenants.auth import KeyAuthenticator, RateLimits
from tierbatch.tenants.store import KeyGrant

pytestmark = pytest.mark.anyio


class Call:
    """A call that waits until released, counting how often it started."""

    def __init__(self, result: object = "answer", error: Exception | None = None) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> object:
        self.started += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_for_one_key_share_one_call() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    call = Call()
    waiting = [asyncio.create_task(flights.run("k", call)) for _ in range(20)]
    await asyncio.sleep(0.01)
    call.release.set()
    assert await asyncio.gather(*waiting) == ["answer"] * 20
    assert call.started == 1


async def test_other_keys_have_their_own_calls() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    a, b = Call("a"), Call("b")
    both = asyncio.gather(flights.run("a", a), flights.run("b", b))
    await asyncio.sleep(0.01)
    a.release.set()
    b.release.set()
    assert await both == ["a", "b"]
    assert (a.started, b.started) == (1, 1)


async def test_an_error_reaches_every_caller_and_the_next_caller_tries_again() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    failing = Call(error=RuntimeError("database down"))
    waiting = [asyncio.create_task(flights.run("k", failing)) for _ in range(5)]
    await asyncio.sleep(0.01)
    failing.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [str(r) for r in results] == ["database down"] * 5
    assert failing.started == 1
    working = Call("back")
    working.release.set()
    assert await flights.run("k", working) == "back"
    assert working.started == 1


async def test_a_cancelled_caller_does_not_cancel_the_others_answer() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    call = Call()
    first = asyncio.create_task(flights.run("k", call))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(flights.run("k", call))
    await asyncio.sleep(0.01)
    first.cancel()  # the first caller's client went away
    call.release.set()
    assert await second == "answer"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert call.started == 1


async def test_after_forget_a_caller_starts_a_new_call() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    old, new = Call("old"), Call("new")
    before = asyncio.create_task(flights.run("k", old))
    await asyncio.sleep(0.01)
    flights.forget()
    after = asyncio.create_task(flights.run("k", new))
    await asyncio.sleep(0.01)
    old.release.set()
    new.release.set()
    assert (await before, await after) == ("old", "new")


class SlowKeys:
    """The key lookup (a query, run in a thread): slow enough that every request arrives while it runs."""

    def __init__(self, grant: KeyGrant) -> None:
        self.grant = grant
        self.lookups = 0
        self.release = threading.Event()

    def __call__(self, key: str) -> KeyGrant | None:
        self.lookups += 1
        self.release.wait(5)
        return self.grant if key == "tb_good" else None


class Generation:
    async def get(self, _key: str) -> bytes | None:
        return b"0"


async def test_concurrent_requests_with_one_key_make_one_lookup() -> None:
    keys = SlowKeys(KeyGrant(uuid.uuid4(), uuid.uuid4(), None, None))
    auth = KeyAuthenticator(keys, Generation(), "p:", RateLimits(MemoryStorage()), 20,  # type: ignore[arg-type]
                            generation_check_seconds=3600.0)
    requests = [asyncio.create_task(auth.grant("tb_good", "10.0.0.1")) for _ in range(30)]
    await asyncio.sleep(0.05)
    keys.release.set()
    assert await asyncio.gather(*requests) == [keys.grant] * 30
    assert keys.lookups == 1


class CountedPolicies(TenantPolicies):
    """The policy lookup (queries, run in a thread) replaced by a slow, counted one."""

    def __init__(self) -> None:
        super().__init__(None, parse_config(default_config_data()))  # type: ignore[arg-type]
        self.lookups: list[uuid.UUID] = []
        self.release = threading.Event()

    def _lookup(self, tenant_id: uuid.UUID) -> TenantPolicy:
        self.lookups.append(tenant_id)
        self.release.wait(5)
        return TenantPolicy({})


async def test_concurrent_calls_of_one_tenant_make_one_policy_lookup() -> None:
    policies = CountedPolicies()
    tenant, other = uuid.uuid4(), uuid.uuid4()
    calls = [asyncio.create_task(policies.policy(tenant)) for _ in range(30)]
    calls.append(asyncio.create_task(policies.policy(other)))
    await asyncio.sleep(0.05)
    policies.release.set()
    assert all(found == TenantPolicy({}) for found in await asyncio.gather(*calls))
    assert sorted(map(str, policies.lookups)) == sorted([str(tenant), str(other)])
    await policies.policy(tenant)  # remembered
    assert len(policies.lookups) == 2
