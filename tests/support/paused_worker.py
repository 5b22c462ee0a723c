"""A worker that stops at one named step of the batch path, for the crash tests: `python -m
tests.support.paused_worker STEP`. It is the production worker (same settings, config, queues) with the
crash-point hook installed through `create_celery_app(..., pause=...)`; it logs the step, then waits there
until the test kills it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tierbatch.base.config import load_config
from tierbatch.base.messaging import ALL_QUEUES
from tierbatch.base.settings import Settings
from tierbatch.cli.main import WORKER_WITHOUT
from tierbatch.worker.app import create_celery_app

log = logging.getLogger("tierbatch.paused_worker")


def pause_at(step: str) -> Callable[[str], None]:
    def pause(reached: str) -> None:
        if reached == step:
            log.warning("PAUSED at %s", step)
            while True:  # until killed
                time.sleep(1)

    return pause


def main(step: str) -> None:
    settings = Settings()
    app = create_celery_app(settings, load_config(settings.config_path), pause=pause_at(step))
    app.worker_main(["worker", "-Q", ",".join(ALL_QUEUES), "-c", "4", "-P", "threads", "--loglevel", "INFO",
                     *WORKER_WITHOUT])


if __name__ == "__main__":
    main(sys.argv[1])
