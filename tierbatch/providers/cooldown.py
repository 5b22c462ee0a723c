"""Model cooldown (a circuit breaker per provider/model), shared by every API process through Redis.

States of a model, read with one MGET per call:

- **closed**: no `open` and no `trip` key. Calls go through. Each retryable failure (5xx, timeout,
  connection error) counts in a window; `failure_threshold` failures within `window_seconds` trip it.
- **open**: the `open` key exists (its TTL is the cooldown). Calls skip the model and go down the
  fallback chain. A 429 opens it at once, for the provider's `retry-after` (capped).
- **half-open**: the cooldown ran out (`open` expired) but `trip` is still there. Exactly one call
  (whoever wins `SET probe NX`) tries the model; the others keep skipping it. The probe's success
  closes the circuit (deletes every key); its failure re-opens it with twice the cooldown, up to
  `max_cooldown_seconds`.

A success on a closed model writes nothing, and each process remembers a *healthy* model for
`local_ttl` seconds (1 s), so the happy path usually costs no round trip at all; another process's trip
is seen within that second, this process's own at once. Anything not healthy is read from Redis on
every call, so a cooldown ends (or is cleared) for everyone at the same moment. If Redis is unreachable, every
model is treated as closed (calls are never refused because of the breaker).
Permanent errors (4xx other than 408/409/429) say nothing about the model's health and are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tierbatch.base.config import ModelRef
from tierbatch.metrics.catalog import COOLDOWN_TRIPS

log = logging.getLogger(__name__)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CooldownPolicy:
    failure_threshold: int = 3
    window_seconds: float = 30.0
    base_cooldown_seconds: float = 5.0
    max_cooldown_seconds: float = 300.0
    # a probe that neither succeeds nor fails within this time (process died) frees the permit
    probe_timeout_seconds: float = 30.0
    # a 429's retry-after is honoured up to this long
    max_rate_limit_cooldown_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class Admission:
    """What the breaker says about one model for one call."""

    ref: ModelRef
    allowed: bool
    probe: bool  # this call is the half-open probe: report its outcome
    state: CircuitState


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


class Cooldown:
    def __init__(self, client: aioredis.Redis, key_prefix: str = "", policy: CooldownPolicy | None = None, *,
                 local_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}tierbatch:cooldown:"
        self.policy = policy or CooldownPolicy()
        self._local_ttl = local_ttl
        self._clock = clock
        # (provider, model) → (trusted until, open, tripped): healthy models as this process last saw them
        self._seen: dict[tuple[str, str], tuple[float, bool, bool]] = {}
        # the MGET in flight per chain: when the memory runs out, concurrent calls share one read
        self._reads: dict[tuple[tuple[str, str], ...], asyncio.Future[list[tuple[bool, bool]]]] = {}

    def _key(self, kind: str, ref: ModelRef) -> str:
        return f"{self._prefix}{kind}:{ref.provider}/{ref.model}"

    def _remember(self, ref: ModelRef, is_open: bool, tripped: bool) -> None:
        key = (ref.provider, ref.model)
        if is_open or tripped:
            self._seen.pop(key, None)  # only a healthy model is remembered
        else:
            self._seen[key] = (self._clock() + self._local_ttl, False, False)

    async def _flags(self, chain: Sequence[ModelRef]) -> list[tuple[bool, bool]]:
        """(open, tripped) per model: from this process's memory while fresh, else one MGET."""
        now = self._clock()
        remembered = [self._seen.get((ref.provider, ref.model)) for ref in chain]
        if all(entry is not None and entry[0] > now for entry in remembered):
            return [(entry[1], entry[2]) for entry in remembered if entry is not None]
        key = tuple((ref.provider, ref.model) for ref in chain)
        read = self._reads.get(key)
        if read is None:
            read = asyncio.ensure_future(self._read_flags(chain))
            self._reads[key] = read
            read.add_done_callback(lambda _: self._reads.pop(key, None))
        return await asyncio.shield(read)

    async def _read_flags(self, chain: Sequence[ModelRef]) -> list[tuple[bool, bool]]:
        values = await self._redis.mget([self._key(kind, ref) for ref in chain for kind in ("open", "trip")])
        flags = [(values[2 * i] is not None, values[2 * i + 1] is not None) for i in range(len(chain))]
        for ref, (is_open, tripped) in zip(chain, flags, strict=True):
            self._remember(ref, is_open, tripped)
        return flags

    async def admit(self, chain: Sequence[ModelRef]) -> list[Admission]:
        """The chain's models in order, each allowed or skipped; at most one probe per call."""
        try:
            flags = await self._flags(chain)
        except RedisError as exc:
            log.warning("cooldown state unreadable, treating every model as healthy: %s", exc)
            return [Admission(ref, True, False, CircuitState.CLOSED) for ref in chain]
        out: list[Admission] = []
        probing = False
        for ref, (is_open, tripped) in zip(chain, flags, strict=True):
            if is_open:
                out.append(Admission(ref, False, False, CircuitState.OPEN))
            elif not tripped:
                out.append(Admission(ref, True, False, CircuitState.CLOSED))
            elif probing:
                out.append(Admission(ref, False, False, CircuitState.HALF_OPEN))
            else:
                won = await self._take_probe(ref)
                probing = won
                out.append(Admission(ref, won, won, CircuitState.HALF_OPEN))
        return out

    async def _take_probe(self, ref: ModelRef) -> bool:
        try:
            return bool(await self._redis.set(self._key("probe", ref), "1", nx=True,
                                              ex=_seconds(self.policy.probe_timeout_seconds)))
        except RedisError:
            return True

    async def state(self, ref: ModelRef) -> CircuitState:
        """What Redis says now (not this process's memory)."""
        values = await self._redis.mget([self._key("open", ref), self._key("trip", ref)])
        if values[0] is not None:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN if values[1] is not None else CircuitState.CLOSED

    async def cooling(self, refs: Sequence[ModelRef]) -> dict[tuple[str, str], bool]:
        """(provider, model) → whether it cools down now (its circuit is open), in one MGET from Redis."""
        if not refs:
            return {}
        values = await self._redis.mget([self._key("open", ref) for ref in refs])
        return {(ref.provider, ref.model): value is not None for ref, value in zip(refs, values, strict=True)}

    async def record_success(self, admission: Admission) -> None:
        if not admission.probe:
            return  # a closed model's success costs nothing
        self._remember(admission.ref, False, False)
        try:
            await self._redis.delete(*(self._key(kind, admission.ref) for kind in ("open", "trip", "probe", "fail")))
        except RedisError as exc:
            log.warning("could not close the circuit of %s/%s: %s", admission.ref.provider, admission.ref.model, exc)
        else:
            log.info("circuit of %s/%s closed: the probe succeeded", admission.ref.provider, admission.ref.model)

    async def record_failure(self, admission: Admission, *, retry_after: float | None = None,
                             rate_limited: bool = False) -> bool:
        """Count a retryable failure; returns True when the model is now cooling down."""
        ref = admission.ref
        policy = self.policy
        try:
            if admission.probe:
                return await self._trip(ref, probe_failed=True)
            if rate_limited:
                wait = min(retry_after if retry_after is not None else policy.base_cooldown_seconds,
                           policy.max_rate_limit_cooldown_seconds)
                return await self._trip(ref, cooldown=wait)
            fail_key = self._key("fail", ref)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(fail_key)
                pipe.expire(fail_key, _seconds(policy.window_seconds), nx=True)
                count, _ = await pipe.execute()
            # exactly one of the concurrent failures that reach the threshold trips the circuit
            if int(count) == policy.failure_threshold:
                return await self._trip(ref)
        except RedisError as exc:
            log.warning("could not count a failure of %s/%s: %s", ref.provider, ref.model, exc)
        return False

    async def _trip(self, ref: ModelRef, *, cooldown: float | None = None, probe_failed: bool = False) -> bool:
        """Open the circuit; the cooldown doubles with each consecutive trip (a failed probe included)."""
        policy = self.policy
        trip_key, open_key = self._key("trip", ref), self._key("open", ref)
        if not probe_failed and await self._redis.exists(open_key):
            self._remember(ref, True, True)
            return True  # already cooling down (calls admitted before it opened are failing now)
        trips = int(await self._redis.incr(trip_key))
        if cooldown is None:
            cooldown = min(policy.base_cooldown_seconds * (2 ** (trips - 1)), policy.max_cooldown_seconds)
        self._remember(ref, True, True)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(open_key, str(trips), ex=_seconds(cooldown))
            # the trip marker outlives the cooldown: after it, one probe decides
            pipe.expire(trip_key, _seconds(policy.max_cooldown_seconds * 4))
            pipe.delete(self._key("fail", ref), self._key("probe", ref))
            await pipe.execute()
        COOLDOWN_TRIPS.labels(ref.provider, ref.model).inc()
        log.warning("%s/%s cooled down for %.0fs (%s, trip %d)", ref.provider, ref.model, cooldown,
                    "probe failed" if probe_failed else "failing", trips)
        return True

    async def retry_after(self, chain: Sequence[ModelRef]) -> float | None:
        """Seconds until the first model of the chain leaves its cooldown (None if none is cooling)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for ref in chain:
                    pipe.pttl(self._key("open", ref))
                ttls = await pipe.execute()
        except RedisError:
            return None
        waits = [int(t) / 1000 for t in ttls if t is not None and int(t) > 0]
        return min(waits) if waits else None

    async def reset(self, refs: Sequence[ModelRef]) -> None:
        keys = [self._key(kind, ref) for ref in refs for kind in ("open", "trip", "probe", "fail")]
        if keys:
            await self._redis.delete(*keys)
