"""The multiprocess directory's life: made fresh for a stack, chosen before the first series exists, and
cleared of a dead process's live gauges."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from prometheus_client import multiprocess

from tierbatch.metrics.exposition import MULTIPROC_ENV, multiprocess_directory


def fresh_directory(path: Path) -> Path:
    """An empty directory at `path` (the files of a previous run's processes would be summed in)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ensure_multiprocess_directory() -> str:
    """The directory this process and its children write to: `PROMETHEUS_MULTIPROC_DIR`, or a new temporary
    one set in the environment (a prefork worker serving its own port needs one to see its children).

    Must run before the first series is created: prometheus_client picks per-process files or memory then."""
    directory = multiprocess_directory()
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return directory
    if "tierbatch.metrics.catalog" in sys.modules:
        raise RuntimeError("the metrics directory must be chosen before tierbatch.metrics.catalog is imported")
    directory = tempfile.mkdtemp(prefix="tierbatch-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def mark_dead(pid: int) -> None:
    """A child process ended: drop its live gauges (its counters stay in the sums)."""
    directory = multiprocess_directory()
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)
