"""One provider call, timed and, when it fails, counted by the class of its failure."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tierbatch.base.errors import ProviderError
from tierbatch.metrics.catalog import PROVIDER_CALL_ERRORS, PROVIDER_CALL_SECONDS, Surface, status_class


@functools.lru_cache(maxsize=4096)
def _call_seconds(provider: str, model: str, surface: str) -> Any:
    """The histogram's child for these labels, looked up once (`labels()` takes a lock and checks its
    arguments on every call: a few microseconds on the gateway's hot path)."""
    return PROVIDER_CALL_SECONDS.labels(provider, model, surface)


@contextmanager
def timed_call(provider: str, model: str, surface: Surface) -> Iterator[None]:
    """Observe the call's duration whatever its outcome; count a provider error by status class."""
    started = time.perf_counter()
    try:
        yield
    except ProviderError as exc:
        PROVIDER_CALL_ERRORS.labels(provider, model, surface.value,
                                    status_class(exc.status_code, timed_out=exc.timed_out)).inc()
        raise
    finally:
        _call_seconds(provider, model, surface.value).observe(time.perf_counter() - started)
