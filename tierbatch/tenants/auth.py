"""API keys at the door: which tenant is calling, and whether it may call now. Shared by every surface.

- A valid key is remembered per process for `ttl` seconds, so a hot caller costs no query. Revoking a key
  (or changing a tenant's limits) increments a generation counter in Redis; each process
  reads it at most every `generation_check_seconds` and forgets everything it remembered when it moved. So
  a revoked key is refused by every API process within that interval (plus one query). While Redis cannot
  be read nothing is remembered: every call asks the database (fail closed).
- A bad key is remembered too (`negative_ttl`), so a flood of one wrong key costs no query, and failures
  are counted per client address across processes: past `failed_per_minute` the address's failures are
  answered 429 instead of 401 until its window frees. A right key or admin token always passes, so guesses
  from a shared address cannot lock its real users out; `exempt_networks` (loopback by default: the host
  itself, or a reverse proxy every client shares) are not counted.
- Per-tenant limits (`requests_per_minute`, `tokens_per_minute`) are counted in Redis by `limits`
  (sliding-window counters: two keys per limit, one round trip per check), shared by all API processes.
  A tenant with no limit set costs no round trip. While Redis is unreachable a limited tenant is refused
  (the Redis error propagates: nothing unmetered); failed authentications are then not counted.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import NoReturn

import anyio
import redis.asyncio as aioredis
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base.errors import RateLimited, Unauthenticated
from tierbatch.base.flights import SingleFlight
from tierbatch.tenants.store import KeyGrant, grant_for_key, hash_api_key

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 256  # ours are 46; anything much longer is refused without a query
BYTES_PER_TOKEN = 4  # the admission estimate of a prompt's tokens (no tokenizer on the hot path)


def secret_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of two secrets as bytes: any header value (non-ASCII included) is safe."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def estimated_tokens(byte_count: int) -> int:
    return max(1, math.ceil(byte_count / BYTES_PER_TOKEN))


def limits_storage(redis_client: aioredis.Redis, redis_url: str, key_prefix: str) -> RedisStorage:
    """`limits`' async Redis storage over the process's own connection pool (redis-py, no second client)."""
    scheme, sep, rest = redis_url.partition("://")
    uri = f"async+{'redis+unix' if scheme == 'unix' else scheme}{sep}{rest}"
    return RedisStorage(uri, implementation="redispy", key_prefix=f"{key_prefix}limits",
                        connection_pool=redis_client.connection_pool)


def database_lookup(sessions: sessionmaker[Session]) -> Callable[[str], KeyGrant | None]:
    def lookup(api_key: str) -> KeyGrant | None:
        with sessions() as session:
            return grant_for_key(session, api_key)

    return lookup


def generation_key(key_prefix: str) -> str:
    return f"{key_prefix}tierbatch:auth:generation"


async def bump_generation(redis_client: aioredis.Redis, key_prefix: str) -> None:
    """Tell every API process to forget the keys and limits it remembers (after the change is committed)."""
    await redis_client.incr(generation_key(key_prefix))


def sliding_window_wait(previous: int, previous_ttl: float, current: int, current_ttl: float, expiry: float,
                        limit: int, cost: int) -> float:
    """Seconds until `cost` fits under `limit` in `limits`' sliding-window counter, nothing else counted.

    The counter weighs the previous window by the share of it still ahead (`previous_ttl / expiry`) and adds
    the current window; the current window becomes the previous one when its key's TTL drops to `expiry`.
    """
    room = limit - cost
    roll = current_ttl - expiry if current_ttl > expiry else math.inf
    if current <= room:  # enough once the previous window has decayed far enough
        wait = 0.0 if previous == 0 else max(0.0, previous_ttl - expiry * (room - current) / previous)
        if wait < roll:
            return wait
    if math.isinf(roll):
        return expiry
    # after the roll the current count is the previous one, decaying from full weight
    return roll + max(0.0, expiry * (1 - room / current)) if current else roll


class RateLimits:
    """Per-minute sliding-window counters in Redis, shared by every API process."""

    def __init__(self, storage: RedisStorage | MemoryStorage) -> None:  # memory: unit tests
        self._storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    async def _wait(self, item: RateLimitItem, cost: int, *identifiers: str) -> int:
        window = await self._storage.get_sliding_window(item.key_for(*identifiers), item.get_expiry())
        wait = sliding_window_wait(*window, float(item.get_expiry()), item.amount, cost)
        return min(2 * item.get_expiry(), max(1, math.ceil(wait)))

    async def _hit(self, item: RateLimitItem, cost: int, *identifiers: str) -> int | None:
        """None when admitted (and counted), else the seconds until a retry may pass."""
        if await self._limiter.hit(item, *identifiers, cost=cost):
            return None
        return await self._wait(item, cost, *identifiers)

    async def admit_request(self, grant: KeyGrant) -> None:
        if grant.requests_per_minute is None:
            return
        wait = await self._hit(RateLimitItemPerMinute(grant.requests_per_minute), 1, "requests",
                               str(grant.tenant_id))
        if wait is not None:
            raise RateLimited(f"Rate limit reached on requests per min (RPM): limit {grant.requests_per_minute}. "
                              f"Please try again in {wait}s.", wait, "requests")

    async def admit_tokens(self, grant: KeyGrant, tokens: int) -> None:
        limit = grant.tokens_per_minute
        if limit is None:
            return
        if tokens > limit:
            raise RateLimited(f"Request too large: about {tokens} tokens, over the limit on tokens per min (TPM) "
                              f"of {limit}. Please reduce the size of the request.", 60, "tokens")
        wait = await self._hit(RateLimitItemPerMinute(limit), tokens, "tokens", str(grant.tenant_id))
        if wait is not None:
            raise RateLimited(f"Rate limit reached on tokens per min (TPM): limit {limit}, requested {tokens}. "
                              f"Please try again in {wait}s.", wait, "tokens")

    # Failed authentications are a second line (keys are unguessable; bad ones are also cached): while Redis
    # is unreachable they are not counted, rather than refusing every caller whose key is not remembered.
    async def failures_exhausted(self, item: RateLimitItem, address: str) -> int | None:
        try:
            if await self._limiter.test(item, "auth-failures", address):
                return None
            return await self._wait(item, 1, "auth-failures", address)
        except RedisError:
            return None

    async def count_failure(self, item: RateLimitItem, address: str) -> None:
        with contextlib.suppress(RedisError):
            await self._limiter.hit(item, "auth-failures", address)


class KeyAuthenticator:
    """The grant of an API key, or `Unauthenticated`; `RateLimited` for an address with too many failures."""

    def __init__(self, lookup: Callable[[str], KeyGrant | None], redis_client: aioredis.Redis, key_prefix: str,
                 limits: RateLimits, failed_per_minute: int, *, ttl: float = 10.0, negative_ttl: float = 5.0,
                 generation_check_seconds: float = 0.25, max_entries: int = 10_000,
                 exempt_networks: Sequence[IPv4Network | IPv6Network] = ()) -> None:
        self._lookup = lookup  # blocking (a query): run in a thread
        self._redis = redis_client
        self._generation_key = generation_key(key_prefix)
        self._limits = limits
        self._failures = RateLimitItemPerMinute(failed_per_minute)
        self._exempt = tuple(exempt_networks)
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._check_every = generation_check_seconds
        self._max_entries = max_entries
        self._valid: dict[str, tuple[float, KeyGrant]] = {}
        self._invalid: dict[str, float] = {}
        self._generation: bytes | None = None
        self._next_check = 0.0
        self._blind = True  # until the generation was read once: nothing is remembered
        self._epoch = 0  # counts forgets: a lookup started before one is not remembered
        self._lookups: SingleFlight[str, KeyGrant | None] = SingleFlight()  # by key digest

    def _forget(self) -> None:
        self._valid.clear()
        self._invalid.clear()
        self._lookups.forget()  # a lookup started before a revocation answers only its own callers
        self._epoch += 1

    async def _refresh(self, now: float) -> None:
        if now < self._next_check:
            return
        self._next_check = now + self._check_every
        try:
            generation = await self._redis.get(self._generation_key)
        except RedisError as exc:
            if not self._blind:
                log.warning("key cache off: the revocation counter cannot be read (%s)", type(exc).__name__)
            self._blind = True
            self._forget()
            return
        if self._blind or generation != self._generation:
            self._forget()
        self._generation, self._blind = generation, False

    async def grant(self, api_key: str, address: str) -> KeyGrant:
        now = time.monotonic()
        await self._refresh(now)
        digest = hash_api_key(api_key)
        known = self._valid.get(digest)
        if known is not None and known[0] > now:
            return known[1]
        grant: KeyGrant | None = None
        if len(api_key) <= MAX_KEY_CHARS and self._invalid.get(digest, 0.0) <= now:
            grant = await self._lookups.run(digest, lambda: self._look_up(api_key, digest))
        if grant is None:
            await self._refuse(address, "invalid API key")
        return grant

    async def _look_up(self, api_key: str, digest: str) -> KeyGrant | None:
        """One lookup of a key however many requests wait for it; remembered unless a forget came
        meanwhile."""
        epoch = self._epoch
        grant = await anyio.to_thread.run_sync(self._lookup, api_key)
        if epoch == self._epoch and not self._blind:
            self._remember(digest, grant, time.monotonic())
        return grant

    async def _refuse(self, address: str, message: str, *, challenge: bool = True) -> NoReturn:
        """A failed authentication: 429 once the address has used up its failures, else counted and 401. A
        right secret is never refused here, so guesses from an address cannot lock its real users out."""
        if self._counted(address):
            wait = await self._limits.failures_exhausted(self._failures, address)
            if wait is not None:
                raise RateLimited("Too many failed authentications from this address. "
                                  f"Please try again in {wait}s.", wait, "failed_authentications")
            await self._limits.count_failure(self._failures, address)
        raise Unauthenticated(message, "invalid_api_key", challenge=challenge)

    def _counted(self, address: str) -> bool:
        try:
            ip = ip_address(address)
        except ValueError:
            return True
        return not any(ip in network for network in self._exempt)

    def _remember(self, digest: str, grant: KeyGrant | None, now: float) -> None:
        if len(self._valid) + len(self._invalid) > self._max_entries:
            self._valid.clear()
            self._invalid.clear()
        if grant is None:
            self._invalid[digest] = now + self._negative_ttl
        else:
            self._valid[digest] = (now + self._ttl, grant)
            self._invalid.pop(digest, None)

    async def check_admin(self, token: str, expected: str, address: str) -> None:
        """`Unauthenticated` unless `token` is the admin token (none configured: admin routes are off);
        failures count against the address like bad keys."""
        if not expected or not secret_matches(token, expected):
            await self._refuse(address, "admin token required", challenge=False)
