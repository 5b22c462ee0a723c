"""One lookup at a time per key: concurrent callers asking for the same thing share one call.

What a process remembers for a few seconds (a key's grant, a tenant's policy) expires for every request
at once: without this, each of the requests in flight at that moment would run the same lookup (a
thread and a few queries each) for the same answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """`run(key, call)`: the first caller for `key` starts `call()` as a task of its own, so that cancelling
    that caller (its client went away) does not cancel the others' answer; every caller for `key` until it
    ends gets its result or its error. The next caller after that starts a new one."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    def forget(self) -> None:
        """Callers from now on start new calls (those in flight still answer their own callers)."""
        self._flights.clear()

    def _landed(self, key: K, flight: asyncio.Task[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # seen: when every caller was cancelled, nobody else reads it
