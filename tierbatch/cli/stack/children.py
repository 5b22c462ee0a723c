"""The local stack's child processes: each in its own process group, output to a log file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tierbatch.cli.embedded.processes import pid_alive


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


class Child:
    """One child process in its own process group, output to a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(args, env=dict(env), stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self._family: set[int] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return log_tail(self.log_path, 100_000)

    def _descendants(self) -> set[int]:
        import psutil

        try:
            return {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.Error:
            return set()

    def terminate(self) -> None:
        """SIGTERM to the whole group (remembering the family, to SIGKILL stragglers later)."""
        if self.alive():
            self._family |= self._descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)

    def gone(self) -> bool:
        if self.alive():
            return False
        return not any(pid_alive(pid) for pid in self._family)

    def kill(self) -> None:
        """SIGKILL whatever remains of the group and the family, reap, close the log."""
        if self.alive():
            self._family |= self._descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self._family:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in self._family) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._log.closed:
            self._log.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
