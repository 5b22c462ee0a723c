"""Child processes for integration tests: started in their own session, always stopped.

Every process a test starts goes through `ManagedProcess`, so a failing test still
kills the whole process group (a Celery prefork worker has children).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the predicate may fail while a service starts
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {message} (last error: {last_error!r})")


class ManagedProcess:
    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.args = list(args)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.args, env=full_env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def logged(self, text: str) -> bool:
        """Whether `text` is anywhere in the whole log (`log_text` is its tail alone)."""
        return bool(self.log_path and self.log_path.exists() and text in self.log_path.read_text(errors="replace"))

    def json_log_lines(self) -> list[dict[str, object]]:
        """Every JSON line of the whole log (a process started with TIERBATCH_LOG_FORMAT=json); other
        output (a traceback a library printed) is skipped."""
        if not (self.log_path and self.log_path.exists()):
            return []
        lines: list[dict[str, object]] = []
        for text in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(text)
                if isinstance(value, dict):
                    lines.append(value)
        return lines

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # children of a prefork pool may outlive the parent: clear the group in any case
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def managed(args: Sequence[str], env: Mapping[str, str] | None = None,
            log_path: Path | None = None) -> Iterator[ManagedProcess]:
    proc = ManagedProcess(args, env=env, log_path=log_path)
    try:
        yield proc
    finally:
        proc.stop()


def wait_http_ok(url: str, timeout: float = 20.0, proc: ManagedProcess | None = None) -> None:
    def ready() -> bool:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited early: {proc.args}\n{proc.log_text()}")
        return httpx.get(url, timeout=1.0).status_code < 500

    try:
        wait_until(ready, timeout, interval=0.1, message=url)
    except TimeoutError:
        raise TimeoutError(f"{url} not ready; log:\n{proc.log_text() if proc else ''}") from None


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
