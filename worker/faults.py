"""Test-only pause points: with TIERBATCH_TEST_PAUSE_AT=<step> a worker logs the step and stops
there, so a crash test can SIGKILL it at exactly that point. Unset in production: a no-op."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
PAUSE_ENV = "TIERBATCH_TEST_PAUSE_AT"


def pause_point(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        log.warning("PAUSED at %s", step)
        while True:  # until killed
            time.sleep(1)
