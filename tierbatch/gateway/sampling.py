"""The quality monitor's share of gateway calls: which recorded calls the workers look at for a shadow.

A call the gateway answered and recorded (`tierbatch.gateway.recorder`) is, like any task, a candidate for
a shadow (a light answer re-run on the premium model) or a probe (a promoted type's answer re-run on the
light model). The decision needs the task's stored request (its sample point is a hash of it) and its
routing rule, so it is the workers' (`tierbatch.worker.quality.sample_gateway_calls`); the API only says
which calls were recorded. `CallSampler` gathers the ids of committed, succeeded, provider-answered calls
of a tier that can be sampled at all (`may_shadow`) and sends them about once a second, in one message per
`MAX_IDS_PER_MESSAGE`: no message per call on the hot path, and nothing at a sampling rate of 0.

Sampling must never fail a call: a message that cannot be sent is logged and its calls are not sampled
(nor are those still gathered when the process dies); the monitor's window fills from the next ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import anyio

from tierbatch.base.config import AppConfig
from tierbatch.base.states import Mode, TaskStatus
from tierbatch.gateway.recorder import CallRecord
from tierbatch.quality.monitor import may_shadow

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
MAX_IDS_PER_MESSAGE = 1_000

# sends one message naming these task ids (blocking: it runs on a worker thread)
PublishIds = Callable[[list[str]], None]


class CallSampler:
    def __init__(self, config: AppConfig, publish: PublishIds, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._config = config
        self._publish = publish
        self._flush_seconds = flush_seconds
        self._ids: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def committed(self, records: Sequence[CallRecord]) -> None:
        """The records whose rows just committed (the recorder's hook; on the event loop, never raises)."""
        for record in records:
            if (record.status is TaskStatus.SUCCEEDED and record.mode is Mode.IMMEDIATE
                    and record.provider is not None and may_shadow(self._config, record.route.tier)):
                self._ids.append(str(record.task_id))
        if self._ids and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        while self._ids:
            with contextlib.suppress(TimeoutError):  # a second's calls in one message, unless stopping
                await asyncio.wait_for(self._closing.wait(), self._flush_seconds)
            await self.flush()

    async def flush(self) -> None:
        """Send what was gathered now, in messages of at most MAX_IDS_PER_MESSAGE ids."""
        ids, self._ids = self._ids, []
        for start in range(0, len(ids), MAX_IDS_PER_MESSAGE):
            chunk = ids[start:start + MAX_IDS_PER_MESSAGE]
            try:
                await anyio.to_thread.run_sync(self._publish, chunk)
            except Exception:  # the broker may be down: these calls go unsampled, the calls themselves stand
                log.warning("could not send %d gateway calls to the quality monitor", len(chunk), exc_info=True)

    async def aclose(self) -> None:
        """Send what is still gathered (the process is stopping)."""
        self._closing.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()
