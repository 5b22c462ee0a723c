"""Everything a running simulator remembers, held on `app.state.sim` (no module-level state)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from tierbatch.simulator.config import ModelSettings, SimConfig
from tierbatch.simulator.message_batch_store import MessageBatchStore
from tierbatch.simulator.stats import Stats
from tierbatch.simulator.tokens import PrefixCache

if TYPE_CHECKING:
    from fastapi import Request

    from tierbatch.simulator.batch_store import BatchStore
    from tierbatch.simulator.file_store import FileStore


BATCHES_ANSWERED_AT_ONCE = 2


class SimState:
    def __init__(self, config: SimConfig, files: FileStore, batches: BatchStore) -> None:
        self.config = config
        self.stats = Stats()
        self.prefix_cache = PrefixCache(config.prompt_cache_entries)
        self.rng = random.Random()
        self.files = files
        self.batches = batches
        self.message_batches = MessageBatchStore()
        self.tasks: set[asyncio.Task[None]] = set()
        # batches read and answered at once: each holds its lines and answers in memory meanwhile (about
        # 80 MB for 50,000 lines), so a backlog of large batches waits here instead of growing the process
        self.batches_answering = asyncio.Semaphore(BATCHES_ANSWERED_AT_ONCE)
        self._settings: dict[str, ModelSettings] = {}
        self._gc_pauses = 0
        self._gc_was_enabled = True

    def set_config(self, config: SimConfig) -> None:
        self.config = config
        self._settings.clear()
        self.prefix_cache.resize(config.prompt_cache_entries)

    def settings_for(self, model: str) -> ModelSettings:
        settings = self._settings.get(model)
        if settings is None:
            settings = self.config.model_settings(model)
            if len(self._settings) > 10_000:
                self._settings.clear()
            self._settings[model] = settings
        return settings

    @contextlib.contextmanager
    def gc_paused(self) -> Iterator[None]:
        """Pause the cyclic GC (process-wide) while any caller is inside; nests across batches."""
        if self._gc_pauses == 0:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
        self._gc_pauses += 1
        try:
            yield
        finally:
            self._gc_pauses -= 1
            if self._gc_pauses == 0 and self._gc_was_enabled:
                gc.enable()

    def reset(self) -> None:
        self.stats.reset()
        self.prefix_cache.clear()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background coroutine, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.files.close()


def sim_state(request: Request) -> SimState:
    state = request.app.state.sim
    assert isinstance(state, SimState)
    return state
