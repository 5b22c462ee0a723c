"""PgBouncer in transaction pooling mode in front of a test Postgres: its own process on a free port, from a
config file written into a directory of its own, stopped by the test that started it.

The binary comes from the system (`apt-get install pgbouncer`; .ci/run installs it): a missing one fails
the test, never skips it. PgBouncer refuses to run as root; as root it is told to switch to the `postgres`
system user (which the Debian package creates), and its directory belongs to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.support.procs import ManagedProcess, free_port, wait_until

RUN_AS_WHEN_ROOT = "postgres"


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer")
    if found is None:
        pytest.fail("pgbouncer is not installed (apt-get install -y pgbouncer); the PgBouncer tests must run")
    return found


class PgBouncer:
    """Pools every database of `server_url`'s Postgres in transaction mode, at most `pool_size` server
    connections per database and user."""

    def __init__(self, server_url: str, *, pool_size: int) -> None:
        self.server = make_url(server_url)
        self.pool_size = pool_size
        self.port = free_port()
        self.binary = pgbouncer_binary()
        # outside pytest's own temporary tree: pytest keeps that 0700, and as root PgBouncer runs as another user
        self.directory = Path(tempfile.mkdtemp(prefix="tierbatch-pgbouncer-"))
        self.proc: ManagedProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "pgbouncer.log"

    def url_for(self, database_url: str) -> str:
        """`database_url` (a database of the server) through PgBouncer."""
        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _write_config(self) -> Path:
        user = self.server.username or "postgres"
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        config = self.directory / "pgbouncer.ini"
        run_as = f"user = {RUN_AS_WHEN_ROOT}\n" if os.geteuid() == 0 else ""
        config.write_text(f"""
[databases]
* = host={self.server.host or "127.0.0.1"} port={self.server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 500
max_db_connections = {self.pool_size}
logfile = {self.log_path}
pidfile = {self.directory / "pgbouncer.pid"}
{run_as}""")
        if os.geteuid() == 0:
            account = pwd.getpwnam(RUN_AS_WHEN_ROOT)
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        return config

    def start(self) -> None:
        self.proc = ManagedProcess([self.binary, str(self._write_config())], log_path=self.directory / "stdout.log")
        database = self.url_for(self.server.set(database="postgres").render_as_string(hide_password=False))
        wait_until(lambda: _answers(database), 20, 0.1, "pgbouncer accepting connections")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _answers(sqlalchemy_url: str) -> bool:
    dsn = make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, connect_timeout=2, prepare_threshold=None) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)
