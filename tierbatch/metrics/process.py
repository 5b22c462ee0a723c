"""The multiprocess directory's life: made fresh for a stack, chosen before the first series exists, and
cleared of a dead process's live gauges.

Imports nothing of prometheus_client at module level: it picks per-process files or memory for every
series from `PROMETHEUS_MULTIPROC_DIR` when first imported, so the directory is chosen before that.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def fresh_directory(path: Path) -> Path:
    """An empty directory at `path` (the files of a previous run's processes would be summed in)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ensure_multiprocess_directory() -> str:
    """The directory this process and its children write to: `PROMETHEUS_MULTIPROC_DIR`, or a new temporary
    one set in the environment and removed when this process exits (a prefork worker serving its own port
    needs one to see its children's series).

    Must run before the first series is created."""
    directory = multiprocess_directory()
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return directory
    if "tierbatch.metrics.catalog" in sys.modules:
        raise RuntimeError("the metrics directory must be chosen before tierbatch.metrics.catalog is imported")
    directory = tempfile.mkdtemp(prefix="tierbatch-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # imported already (by a library), before any series of ours: the value class is chosen again from
        # the environment, as prometheus_client does at import; series read it when they are created
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    atexit.register(_remove_if_creator, directory, os.getpid())
    return directory


def _remove_if_creator(directory: str, creator: int) -> None:
    """At exit of the process that made the directory; never of a forked child running atexit handlers."""
    if os.getpid() == creator:
        shutil.rmtree(directory, ignore_errors=True)


def mark_dead(pid: int) -> None:
    """A child process ended: drop its live gauges (its counters stay in the sums)."""
    directory = multiprocess_directory()
    if directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
