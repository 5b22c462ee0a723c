"""`tierbatch up`: the all-in-one local stack, as a reusable context manager.

    with LocalStack(Path(".tierbatch"), api_port=8000, simulator_port=8100) as info:
        ... info.api_url, info.dev_api_key, info.admin_token, info.simulator_url ...

Starting: check the ports, then embedded Postgres / Redis (unless `DATABASE_URL` / `REDIS_URL` are set),
migrations and the dev tenant in-process, then the simulator (unless `TIERBATCH_CONFIG` names the
providers), the open model with `open_model` (tierbatch.cli.stack.open_model), API, worker and beat as
child processes, each in its own process group, logging to `<dir>/logs/NAME.log`, writing their metrics to
`<dir>/metrics` (PROMETHEUS_MULTIPROC_DIR, emptied at each start; the API's /metrics sums them). Leaving the block
(normally, on an exception, on Ctrl-C) stops the children (SIGTERM to each group, then SIGKILL), then
the embedded servers: nothing is left behind.

Secrets of the stack kept in `<dir>` (mode 0600), made on the first start when the environment has none:
`admin_token` (TIERBATCH_ADMIN_TOKEN) and `secret_key` (TIERBATCH_SECRET_KEY, which encrypts the
webhook secrets in the database: losing it means rotating them).

The command itself, the stack in the foreground until Ctrl-C: `tierbatch.cli.stack.up`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console

from tierbatch.cli.embedded.postgres import EmbeddedPostgres
from tierbatch.cli.embedded.processes import free_port, pid_alive, port_accepts
from tierbatch.cli.embedded.redis import EmbeddedRedis
from tierbatch.cli.embedded.server import EmbeddedServiceError
from tierbatch.cli.stack.children import Child, log_tail, wait_until
from tierbatch.cli.stack.open_model import (
    OpenModelSpec,
    OpenModelUnavailable,
    config_overrides,
    healthy,
    server_command,
)
from tierbatch.cli.stack.signals import signals_ignored
from tierbatch.cli.stack.toml_writer import deep_merge, dump_toml

HOST = "127.0.0.1"
DEV_TENANT_NAME = "dev"
STOP_TIMEOUT = 20.0
READY_TIMEOUT = 90.0


class StackError(RuntimeError):
    """The stack cannot start or keep running; the message says why."""


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port and we could bind it."""
    if port_accepts(port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _read_text(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value or None


@dataclass(frozen=True)
class StackInfo:
    data_dir: Path
    api_url: str
    simulator_url: str | None
    dev_api_key: str
    admin_token: str
    logs_dir: Path
    database_url: str
    redis_url: str
    config_path: Path | None
    embedded_database: bool
    embedded_redis: bool
    open_model_url: str | None = None  # llama-server's OpenAI base URL, with `open_model`

    @property
    def openai_base_url(self) -> str:
        return f"{self.api_url}/v1"


class LocalStack:
    """Embedded services + simulator + API + worker + beat, stopped on exit (see the module doc).

    `api_port` / `simulator_port` of None pick free ports. `simulator` forces the simulator even
    when TIERBATCH_CONFIG is set. `config_overrides` are merged into the generated default config
    (only used when the stack generates it, i.e. TIERBATCH_CONFIG is not set). `open_model` starts
    llama-server with SmolLM2 as the light tier of that generated config.
    """

    def __init__(self, data_dir: str | os.PathLike[str] = ".tierbatch", *, api_port: int | None = 8000,
                 simulator_port: int | None = 8100, concurrency: int = 2, simulator: bool = False,
                 tenant_name: str = DEV_TENANT_NAME, config_overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None, console: Console | None = None,
                 ready_timeout: float = READY_TIMEOUT, open_model: bool = False) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.logs_dir = self.data_dir / "logs"
        self.requested_api_port = api_port
        self.requested_simulator_port = simulator_port
        self.concurrency = concurrency
        self.force_simulator = simulator
        self.tenant_name = tenant_name
        self.config_overrides = dict(config_overrides or {})
        self.environ = dict(os.environ if environ is None else environ)
        self.console = console or Console(stderr=True)
        self.ready_timeout = ready_timeout
        self.open_model = open_model
        self.children: list[Child] = []
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.info: StackInfo | None = None
        self._stopped = False

    # -- lifecycle

    def __enter__(self) -> StackInfo:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _say(self, message: str) -> None:
        self.console.print(f"[dim]·[/] {message}", highlight=False)

    def start(self) -> StackInfo:
        user_config = self.environ.get("TIERBATCH_CONFIG") or None
        run_simulator = user_config is None or self.force_simulator
        api_port = self.requested_api_port or free_port()
        simulator_port: int | None = None
        if run_simulator:
            simulator_port = self.requested_simulator_port or free_port()
            while simulator_port == api_port and self.requested_simulator_port is None:
                simulator_port = free_port()
            if simulator_port == api_port:
                raise StackError(f"--api-port and --simulator-port are both {api_port}")
        # one clear message before anything starts
        for what, port in (("API", api_port), ("simulator", simulator_port)):
            if port is not None and not port_free(port):
                flag = "--api-port" if what == "API" else "--simulator-port"
                raise StackError(f"port {port} ({what}) is already in use; stop what holds it or pass "
                                 f"{flag} with another port")

        open_spec, open_command = self._open_model(user_config)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        admin_token = self._admin_token()
        secret_key = self._secret_key()

        # configuration: the user's file, or the default one written under the data directory
        config_path: Path | None = Path(user_config).expanduser().absolute() if user_config else None
        simulator_url = f"http://{HOST}:{simulator_port}" if simulator_port is not None else None
        if config_path is None:
            config_path = self._write_default_config(f"{simulator_url}/v1")
        self._check_config(config_path)

        database_url = self.environ.get("DATABASE_URL") or None
        redis_url = self.environ.get("REDIS_URL") or None
        try:
            if database_url is None:
                self._say(f"starting embedded PostgreSQL in {self.data_dir / 'pg'}")
                self.postgres = EmbeddedPostgres(self.data_dir)
                database_url = self.postgres.start()
            if redis_url is None:
                self._say(f"starting embedded Redis in {self.data_dir / 'redis'}")
                self.redis = EmbeddedRedis(self.data_dir)
                redis_url = self.redis.start()
        except EmbeddedServiceError as exc:
            raise StackError(str(exc)) from None
        self._check_database(database_url)
        self._check_redis(redis_url)

        self._say("applying migrations")
        from tierbatch.migrations.runner import upgrade_to_head

        upgrade_to_head(database_url, secret_key)
        dev_key = self._dev_tenant(database_url, secret_key)

        env = {**self.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
               "TIERBATCH_ADMIN_TOKEN": admin_token, "TIERBATCH_SECRET_KEY": secret_key, "PYTHONUNBUFFERED": "1",
               # every child writes its metrics here, and the API's /metrics sums them: emptied at each start,
               # or the files of the last run's processes would be summed in
               "PROMETHEUS_MULTIPROC_DIR": str(self._fresh_metrics_dir())}
        if config_path is not None:
            env["TIERBATCH_CONFIG"] = str(config_path)
        else:
            env.pop("TIERBATCH_CONFIG", None)

        python = sys.executable
        if open_spec is not None:
            self._spawn("open-model", open_command, env)
            self._wait_ready("open-model", lambda: healthy(open_spec))
        if simulator_port is not None:
            self._spawn("simulator", [python, "-m", "tierbatch.simulator", "--host", HOST,
                                     "--port", str(simulator_port)],
                        env)
        self._spawn("api", [python, "-m", "tierbatch.cli", "api", "--host", HOST, "--port", str(api_port)], env)
        self._spawn("worker", [python, "-m", "tierbatch.cli", "worker", "--concurrency", str(self.concurrency)], env)
        self._spawn("beat", [python, "-m", "tierbatch.cli", "beat", "--schedule",
                             str(self.data_dir / "celerybeat-schedule")], env)

        api_url = f"http://{HOST}:{api_port}"
        if simulator_url is not None:
            self._wait_ready("simulator", lambda: self._http_ok(f"{simulator_url}/_sim/stats"))
        self._wait_ready("api", lambda: self._http_ok(f"{api_url}/readyz"))
        worker = self.child("worker")
        self._wait_ready("worker", lambda: "ready." in worker.log_text())

        self.info = StackInfo(
            data_dir=self.data_dir, api_url=api_url, simulator_url=simulator_url, dev_api_key=dev_key,
            admin_token=admin_token, logs_dir=self.logs_dir, database_url=database_url,
            redis_url=redis_url, config_path=config_path, embedded_database=self.postgres is not None,
            embedded_redis=self.redis is not None,
            open_model_url=open_spec.base_url if open_spec is not None else None,
        )
        return self.info

    def stop(self) -> None:
        """Stop children (SIGTERM to each group, wait, SIGKILL), then the embedded servers. Idempotent."""
        with signals_ignored():
            children, self.children = list(reversed(self.children)), []
            if children:
                self._say("stopping " + ", ".join(child.name for child in children))
            try:
                for child in children:
                    child.terminate()
                wait_until(lambda: all(child.gone() for child in children), STOP_TIMEOUT)
            finally:
                for child in children:
                    child.kill()
                for server in (self.redis, self.postgres):
                    if server is not None:
                        server.stop()
                self.redis = self.postgres = None

    # -- while running

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def dead(self) -> list[str]:
        """Descriptions of the parts that stopped on their own (empty while all is well)."""
        found = [f"{child.name} (exit code {child.popen.returncode}; log {child.log_path})"
                 for child in self.children if not child.alive()]
        for name, server in (("embedded PostgreSQL", self.postgres), ("embedded Redis", self.redis)):
            if server is not None and server.pid is not None and not pid_alive(server.pid):
                found.append(f"{name} (log {server.log_path})")
        return found

    # -- steps

    def _open_model(self, user_config: str | None) -> tuple[OpenModelSpec | None, list[str]]:
        """With `open_model`: its port and command line, its config merged into the generated config."""
        if not self.open_model:
            return None, []
        if user_config is not None:
            raise StackError("--open-model makes the open model the light tier of the generated config, but "
                             "TIERBATCH_CONFIG is set: point a provider of that file at your llama-server instead")
        spec = OpenModelSpec(free_port())
        try:
            command = server_command(spec)
        except OpenModelUnavailable as exc:
            raise StackError(str(exc)) from None
        # the background lane below the worker's concurrency: urgent calls always find a free worker
        lane = max(1, self.concurrency - 1)
        self.config_overrides = deep_merge(self.config_overrides, config_overrides(spec, lane))
        return spec, command

    def _admin_token(self) -> str:
        from tierbatch.base.settings import MIN_ADMIN_TOKEN_CHARS

        token = self.environ.get("TIERBATCH_ADMIN_TOKEN")
        if token:
            if len(token) < MIN_ADMIN_TOKEN_CHARS:
                raise StackError(f"TIERBATCH_ADMIN_TOKEN is {len(token)} characters long; it must be at least "
                                 f"{MIN_ADMIN_TOKEN_CHARS} (or unset it: one is generated)")
            return token
        path = self.data_dir / "admin_token"
        token = _read_text(path)
        if token is None or len(token) < MIN_ADMIN_TOKEN_CHARS:  # none yet, or one too short to keep
            token = secrets.token_urlsafe(32)  # 43 characters
            _write_private(path, token + "\n")
        return token

    def _secret_key(self) -> str:
        """TIERBATCH_SECRET_KEY from the environment, else one kept in the state directory (made once)."""
        from tierbatch.base.errors import ConfigError
        from tierbatch.base.secretbox import SecretBox, generate_key

        key = self.environ.get("TIERBATCH_SECRET_KEY")
        path = self.data_dir / "secret_key"
        if not key:
            key = _read_text(path)
        if key is None:
            key = generate_key()
            _write_private(path, key + "\n")
        try:
            SecretBox.parse(key)
        except ConfigError as exc:
            raise StackError(f"{exc} (from {'the environment' if self.environ.get('TIERBATCH_SECRET_KEY') else path})"
                             ) from None
        return key

    def _write_default_config(self, simulator_url: str) -> Path:
        """The default config (simulator on its port) written under the data directory, with the tenants'
        files directory there too: `[files] root` = <data dir>/files (each tenant gets <root>/<tenant id>/)."""
        from tierbatch.base.config import default_config_data

        files_root = self.data_dir / "files"
        files_root.mkdir(mode=0o750, exist_ok=True)
        data = deep_merge(default_config_data(simulator_url), {"files": {"root": str(files_root)}})
        data = deep_merge(data, self.config_overrides)
        path = self.data_dir / "tierbatch.toml"
        path.write_text("# generated by tierbatch up/demo: the default config, simulator on its port\n"
                        + dump_toml(data))
        return path

    def _check_config(self, path: Path | None) -> None:
        from tierbatch.base.config import load_config
        from tierbatch.base.errors import ConfigError

        try:
            load_config(path, self.environ)
        except ConfigError as exc:
            raise StackError(f"invalid configuration:\n{exc}") from None

    def _check_database(self, database_url: str) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
        last: Exception | None = None
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with engine.connect() as connection:
                        connection.execute(sqlalchemy.text("SELECT 1"))
                    return
                except sqlalchemy.exc.OperationalError as exc:
                    last = exc
                    time.sleep(0.5)
        finally:
            engine.dispose()
        raise StackError(f"database not reachable at {database_url}: {last}")

    def _check_redis(self, redis_url: str) -> None:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise StackError(f"Redis not reachable at {redis_url}: {exc}") from None
        finally:
            client.close()

    def _dev_tenant(self, database_url: str, secret_key: str) -> str:
        """The dev tenant's key: the stored one if the database knows it, else a new tenant."""
        from tierbatch.base.secretbox import SecretBox
        from tierbatch.db.engine import make_engine, make_session_factory
        from tierbatch.tenants.store import create_tenant, tenant_for_key

        path = self.data_dir / "dev_api_key"
        stored = _read_text(path)
        engine = make_engine(database_url, pool_size=1)
        try:
            sessions = make_session_factory(engine)
            if stored is not None:
                with sessions() as session:
                    if tenant_for_key(session, stored) is not None:
                        return stored
            with sessions.begin() as session:
                tenant = create_tenant(session, self.tenant_name, box=SecretBox.parse(secret_key))
        finally:
            engine.dispose()
        _write_private(path, tenant.api_key + "\n")
        return tenant.api_key

    def _fresh_metrics_dir(self) -> Path:
        path = self.data_dir / "metrics"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> None:
        self.children.append(Child(name, args, env, self.logs_dir / f"{name}.log"))

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self, name: str, ready: Callable[[], bool]) -> None:
        self._say(f"waiting for {name}")
        deadline = time.monotonic() + self.ready_timeout
        while True:
            dead = self.dead()
            if dead:
                child = next((c for c in self.children if not c.alive()), None)
                tail = f"\n--- {child.log_path} ---\n{log_tail(child.log_path)}" if child else ""
                raise StackError("exited during start: " + "; ".join(dead) + tail)
            if ready():
                return
            if time.monotonic() >= deadline:
                log = self.logs_dir / f"{name}.log"
                raise StackError(f"{name} not ready after {self.ready_timeout:.0f}s; see {log}\n"
                                 f"{log_tail(log)}")
            time.sleep(0.2)
