"""Process, port and log-file helpers shared by the embedded servers (and by `tierbatch up`)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll until `predicate()` is true; False when the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie counts as gone)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def is_server_for(pid: int, name_prefix: str, directory: Path) -> bool:
    """True when `pid` is a live `name_prefix…` process working in `directory` (not a recycled pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE and str(proc.name()).startswith(name_prefix)
                and Path(proc.cwd()).resolve() == directory.resolve())
    except (psutil.Error, OSError):
        return False


def children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _none_alive(pids: Sequence[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def kill_and_wait(pids: Sequence[int], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`, and wait (bounded) until every pid is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        wait_for(functools.partial(_none_alive, alive), wait)


def read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int, limit: int = 3000) -> str:
    """What the server logged after `offset` (the log is appended to across runs), at most `limit` chars."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")[-limit:]
    except OSError:
        return "(no log)"
