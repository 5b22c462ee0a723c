"""Embedded PostgreSQL and Redis (tierbatch/cli/embedded/): start, use, stop without leftovers, restart, recover."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from tests.support.procs import managed, wait_until
from tierbatch.cli.embedded.postgres import EmbeddedPostgres
from tierbatch.cli.embedded.processes import pid_alive, port_accepts
from tierbatch.cli.embedded.redis import EmbeddedRedis
from tierbatch.cli.embedded.server import EmbeddedServiceError

pytestmark = pytest.mark.integration


def _psycopg_dsn(url: str) -> str:
    assert url.startswith("postgresql+psycopg://"), url
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _assert_gone(pid: int, port: int) -> None:
    wait_until(lambda: not pid_alive(pid), timeout=30, message=f"process {pid} to exit")
    wait_until(lambda: not port_accepts(port), timeout=30, message=f"port {port} to close")


def _pg_write(url: str) -> None:
    with psycopg.connect(_psycopg_dsn(url)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (k text PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO probe VALUES ('answer', '42') ON CONFLICT (k) DO UPDATE SET v = '42'")


def _pg_read(url: str) -> str | None:
    with psycopg.connect(_psycopg_dsn(url)) as conn:
        row = conn.execute("SELECT v FROM probe WHERE k = 'answer'").fetchone()
        return None if row is None else str(row[0])


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def test_start_use_stop_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    pg = EmbeddedPostgres(data_dir)
    rd = EmbeddedRedis(data_dir)
    try:
        pg_url = pg.start()
        redis_url = rd.start()
        assert pg.url == pg_url and rd.url == redis_url
        assert pg_url == f"postgresql+psycopg://tierbatch@127.0.0.1:{pg.port}/tierbatch"
        assert redis_url == f"redis://127.0.0.1:{rd.port}/0"
        assert pg.port not in (5432, 6379) and rd.port not in (5432, 6379)
        assert pg.start() == pg_url  # starting a running instance is a no-op

        _pg_write(pg_url)
        assert _pg_read(pg_url) == "42"
        client = _redis_client(redis_url)
        try:
            assert client.set("tierbatch:probe", "hello")
            assert client.get("tierbatch:probe") == b"hello"
            config = client.config_get("appendonly") | client.config_get("maxmemory-policy")
            assert config == {"appendonly": "yes", "maxmemory-policy": "noeviction"}
        finally:
            client.close()

        pg_pid, pg_port = pg.pid, pg.port
        redis_pid, redis_port = rd.pid, rd.port
        assert pg_pid is not None and pg_port is not None and redis_pid is not None and redis_port is not None
        pg_children = [child.pid for child in psutil.Process(pg_pid).children(recursive=True)]
        assert pg_children  # checkpointer, walwriter, ...
    finally:
        pg.stop()
        rd.stop()
    # stopping twice is harmless
    pg.stop()
    rd.stop()
    assert pg.url is None and rd.url is None
    _assert_gone(pg_pid, pg_port)
    _assert_gone(redis_pid, redis_port)
    for child in pg_children:
        wait_until(lambda child=child: not pid_alive(child), timeout=30, message=f"backend {child} to exit")
    assert not (data_dir / "pg" / "postmaster.pid").exists()

    # a new start on the same directory finds the data again
    with EmbeddedPostgres(data_dir) as pg2, EmbeddedRedis(data_dir) as rd2:
        assert pg2.url is not None and rd2.url is not None
        assert _pg_read(pg2.url) == "42"
        client = _redis_client(rd2.url)
        try:
            assert client.get("tierbatch:probe") == b"hello"
        finally:
            client.close()
        pids = (pg2.pid, rd2.pid)
        ports = (pg2.port, rd2.port)
    for pid, port in zip(pids, ports, strict=True):
        assert pid is not None and port is not None
        _assert_gone(pid, port)


def test_second_instance_on_a_live_directory_fails_clearly(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path) as pg, EmbeddedRedis(tmp_path) as rd:
        with pytest.raises(EmbeddedServiceError, match="in use by another running tierbatch process"):
            EmbeddedPostgres(tmp_path).start()
        with pytest.raises(EmbeddedServiceError, match="in use by another running tierbatch process"):
            EmbeddedRedis(tmp_path).start()
        # the failed attempts did not disturb the running servers
        assert pg.url is not None and rd.url is not None
        assert _probe_table(pg.url) is None
        client = _redis_client(rd.url)
        try:
            assert client.ping()
        finally:
            client.close()


def _probe_table(url: str) -> object:
    """The probe table's regclass, or None: this fresh cluster has no such table."""
    with psycopg.connect(_psycopg_dsn(url)) as conn:
        row = conn.execute("SELECT to_regclass('probe')").fetchone()
        assert row is not None
        return row[0]


_OWNER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tierbatch.cli.embedded.postgres import EmbeddedPostgres
    from tierbatch.cli.embedded.redis import EmbeddedRedis
    pg = EmbeddedPostgres(sys.argv[1]); rd = EmbeddedRedis(sys.argv[1])
    print(pg.start(), pg.pid, rd.start(), rd.pid, flush=True)
    time.sleep(600)
    """
)


def test_recovers_servers_left_by_a_crashed_owner(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    log = tmp_path / "owner.log"
    with managed([sys.executable, "-c", _OWNER_SCRIPT, str(data_dir)], log_path=log) as owner:
        line = wait_until(lambda: log.read_text().strip(), timeout=60, message="owner to start servers")
        pg_url, pg_pid, redis_url, redis_pid = str(line).split()
        _pg_write(pg_url)
        client = _redis_client(redis_url)
        try:
            client.set("survives", "crash")
        finally:
            client.close()
        owner.kill()  # kill -9: no cleanup runs; the servers (own sessions) keep running
    assert pid_alive(int(pg_pid)) and pid_alive(int(redis_pid))

    pg = EmbeddedPostgres(data_dir)
    rd = EmbeddedRedis(data_dir)
    try:
        new_pg_url = pg.start()
        new_redis_url = rd.start()
        # the stale servers were stopped, and their data is found again
        assert not pid_alive(int(pg_pid)) and not pid_alive(int(redis_pid))
        assert _pg_read(new_pg_url) == "42"
        client = _redis_client(new_redis_url)
        try:
            assert client.get("survives") == b"crash"
        finally:
            client.close()
    finally:
        pg.stop()
        rd.stop()
