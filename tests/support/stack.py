"""The running product for integration tests: simulator, API, worker and beat as real processes."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from tests.conftest import TEST_REDIS_URL
from tests.support.procs import ManagedProcess, free_port, python_module, wait_http_ok, wait_until
from tierbatch.migrations.runner import upgrade_to_head

ADMIN_TOKEN = "test-admin-token-0123456789abcdef-local"  # 38 characters: processes refuse < 32
# a fixed Fernet key for the test stacks (webhook secrets are encrypted with it); tests read the DB with it
SECRET_KEY = "dGllcmJhdGNoLXRlc3Qtc2VjcmV0LWtleS0zMmJ5dGU="


def psycopg_dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def scratch_database(base_url: str, prefix: str = "tierbatch_test") -> Iterator[str]:
    """A new, empty database for this run on the same server; dropped afterwards."""
    url = make_url(base_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin_dsn = psycopg_dsn(url.set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# SQL sources of the session stack (tests/integration/test_schedules_sources.py): the worker that reads
# them is started with TB_TEST_TICKETS_DB_URL; granted by tenant name
SESSION_SOURCES = """
[sources.tickets]
url_env = "TB_TEST_TICKETS_DB_URL"
tenants = ["sql-reader"]
statement_timeout_seconds = 1

[sources.tickets_capped]
url_env = "TB_TEST_TICKETS_DB_URL"
tenants = ["sql-reader"]
max_rows = 10

[sources.finance]
url_env = "TB_TEST_TICKETS_DB_URL"
tenants = ["finance-team"]
"""


def files_root_of(config_path: Path) -> Path:
    """`[files] root` of a config written by write_app_config (unless its extra sets another)."""
    return config_path.parent / "files"


def simulator_tiers(simulator_port: int) -> str:
    """The config's provider (the simulator) and its two tiers, as the test stacks and the benches use them."""
    return f"""[providers.sim]
base_url = "http://127.0.0.1:{simulator_port}/v1"
batch = true
prices_from = "openai"

[tiers.light]
provider = "sim"
model = "gpt-4o-mini"
fallbacks = [{{ provider = "sim", model = "gpt-4.1-mini" }}]

[tiers.complex]
provider = "sim"
model = "gpt-4o"
fallbacks = [{{ provider = "sim", model = "gpt-4.1" }}]"""


def write_app_config(path: Path, simulator_port: int, extra: str = "") -> Path:
    # no shadow calls unless a test asks for them (test_quality.py runs a stack of its own)
    quality = "" if "[quality]" in extra else "\n[quality]\nshadow_rate = 0.0\n"
    # tenants' file sources and sinks live in <root>/<tenant id>/
    files = "" if "[files]" in extra else f'\n[files]\nroot = "{files_root_of(path)}"\n'
    # the webhook tests' receivers listen on 127.0.0.1: the session stack lets webhooks go there
    # (test_webhook_targets.py runs a stack of its own with the default, public addresses only)
    webhooks = ("" if "[webhooks]" in extra
                else "\n[webhooks]\nallow_private_networks = true\ntimeout_seconds = 3\n")
    # tests on one stack send many bad keys from 127.0.0.1; test_keys_and_limits.py checks the real limit
    limits = "" if "[limits]" in extra else "\n[limits]\nfailed_auth_per_minute = 100000\n"
    path.write_text(f"""
{simulator_tiers(simulator_port)}

[routing]
classification = "light"
reasoning = "complex"

[immediate]
max_attempts = 3
retries_per_model = 1
backoff_base_seconds = 0.05
backoff_max_seconds = 0.5
lease_seconds = 3

[reconciler]
interval_seconds = 1
queued_stale_seconds = 3
batch_stale_seconds = 3

[batch]
max_requests = 4000
max_wait_seconds = 1
poll_interval_seconds = 0.5
assemble_interval_seconds = 0.5
expected_turnaround_seconds = 30
escalate_before_deadline_seconds = 5
failed_batch_retry_seconds = 0.5
ingest_chunk_lines = 250
max_attempts = 3

[cache.task_types]  # test_response_cache.py: per task type policies beside the default
cached_always = "always"
never_cached = "off"
{quality}
{files}
{webhooks}
{limits}
{extra}
""")
    return path


@dataclass
class Stack:
    tmp: Path
    database_url: str
    redis_url: str
    config_path: Path
    simulator_port: int
    api_port: int
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    # this run's own key space in Redis: parallel runs never consume each other's messages
    redis_prefix: str = field(default_factory=lambda: f"tbtest-{uuid.uuid4().hex[:8]}:")

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                "TIERBATCH_CONFIG": str(self.config_path), "TIERBATCH_ADMIN_TOKEN": ADMIN_TOKEN,
                "TIERBATCH_SECRET_KEY": SECRET_KEY,
                "TIERBATCH_REDIS_PREFIX": self.redis_prefix,
                "TIERBATCH_LOG_FORMAT": "json",  # tests read the processes' logs line by line (json_log_lines)
                # every process writes its metrics here, so the API's /metrics shows the worker's counters
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                "PYTHONUNBUFFERED": "1"}

    @property
    def metrics_dir(self) -> Path:
        """This stack's own (a restarted worker's counters stay in the sums, as in production)."""
        path = self.tmp / "metrics"
        path.mkdir(exist_ok=True)
        return path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.simulator_port}"

    def _start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> ManagedProcess:
        generation = sum(1 for key in self.processes if key.startswith(name))
        proc = ManagedProcess(args, env={**self.env, **(extra_env or {})},
                              log_path=self.tmp / f"{name}-{generation}.log")
        self.processes[f"{name}-{generation}"] = proc
        self.processes[name] = proc
        return proc

    def start_simulator(self) -> None:
        proc = self._start("simulator", python_module("tierbatch.simulator", "--host", "127.0.0.1",
                                                      "--port", str(self.simulator_port)))
        wait_http_ok(f"{self.simulator_url}/_sim/stats", proc=proc)

    def start_api(self) -> None:
        proc = self._start("api", python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port",
                                                str(self.api_port)))
        wait_http_ok(f"{self.api_url}/healthz", proc=proc)

    def start_worker(self, extra_env: dict[str, str] | None = None, *, pause_at: str | None = None
                     ) -> ManagedProcess:
        """The worker; with `pause_at`, one that stops at that batch step (tests/support/paused_worker.py)."""
        args = (python_module("tests.support.paused_worker", pause_at) if pause_at is not None
                else python_module("tierbatch.cli", "worker", "--concurrency", "4", "--pool", "threads"))
        proc = self._start("worker", args, extra_env)
        # 60 s: on two shared cores a worker's start (imports, broker, database) took over 30 s under load
        wait_until(lambda: proc.logged("ready.") or not proc.alive(), 60, 0.1, "worker ready")
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.log_text()}")
        return proc

    def start_beat(self) -> None:
        self._start("beat", python_module("tierbatch.cli", "beat", "--schedule", str(self.tmp / "beat-schedule")))

    def stop_all(self) -> None:
        for key, proc in list(self.processes.items()):
            if "-" in key:
                proc.stop()

    # --- helpers for tests ---------------------------------------------------------------------
    def admin_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            timeout=30)

    def new_tenant_key(self, name: str = "t") -> str:
        return self.new_tenant(name)[1]

    def new_tenant(self, name: str = "t") -> tuple[str, str]:
        """(tenant id, API key) of a new tenant."""
        with self.admin_client() as client:
            response = client.post("/v1/admin/tenants", json={"name": name})
            response.raise_for_status()
            return str(response.json()["id"]), str(response.json()["api_key"])

    def tenant_dir(self, tenant_id: str) -> Path:
        """The tenant's own files directory (`<[files] root>/<tenant id>/`), made if missing."""
        path = files_root_of(self.config_path) / tenant_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def client(self, api_key: str) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)

    def sim(self, method: str, path: str, json: Any = None) -> Any:
        with httpx.Client(base_url=self.simulator_url, timeout=10) as client:
            response = client.request(method, path, json=json)
            response.raise_for_status()
            return response.json()

    def wait_for_task(self, client: httpx.Client, task_id: str, statuses: set[str],
                      timeout: float = 30.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
            return body if body.get("status") in statuses else None

        try:
            return wait_until(reached, timeout, 0.1, f"task {task_id} in {statuses}")  # type: ignore[return-value]
        except TimeoutError:
            last = client.get(f"/v1/tasks/{task_id}").json()
            raise AssertionError(f"task {task_id} never reached {statuses}; last: {last}\n"
                                 f"worker log:\n{self.processes['worker'].log_text()}") from None



@contextlib.contextmanager
def advisory_lock_held(stack: Stack, key_sql: str, key: str) -> Iterator[None]:
    """Hold one of the product's session advisory locks (its key is `key_sql` of `key`, e.g.
    "hashtext(%s)") until the block ends: the work that takes it waits or skips meanwhile."""
    with psycopg.connect(psycopg_dsn(stack.database_url), autocommit=True) as conn:
        conn.execute(f"SELECT pg_advisory_lock({key_sql})", (key,))
        try:
            yield
        finally:
            conn.execute(f"SELECT pg_advisory_unlock({key_sql})", (key,))


def delete_redis_keys(prefix: str) -> None:
    """This run's messages live under its own key prefix; other runs' keys are left alone."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def own_stack(base_database_url: str, tmp: Path, prefix: str, write_config: Callable[[Path, int], Path], *,
              beat: bool = True, processes_database: Callable[[str], str] = str) -> Iterator[Stack]:
    """A stack of a test module's own: its config (`write_config(path, simulator_port)`), a scratch
    database migrated to head, the simulator, API, worker (and beat); everything stopped and dropped after,
    also when the test fails. `processes_database(url)` is the URL the processes (and `Stack.database_url`)
    reach the scratch database by, e.g. through a pooler; migrations and the drop use it directly."""
    simulator_port = free_port()
    config = write_config(tmp / "tierbatch.toml", simulator_port)
    with scratch_database(base_database_url, prefix=prefix) as database_url:
        upgrade_to_head(database_url, SECRET_KEY)
        running = Stack(tmp=tmp, database_url=processes_database(database_url), redis_url=TEST_REDIS_URL,
                        config_path=config, simulator_port=simulator_port, api_port=free_port())
        try:
            running.start_simulator()
            running.start_api()
            running.start_worker()
            if beat:
                running.start_beat()
            yield running
        finally:
            running.stop_all()
            delete_redis_keys(running.redis_prefix)


@contextlib.contextmanager
def sibling_stack(stack: Stack, tmp: Path, extra_config: str) -> Iterator[Stack]:
    """API, worker and beat of a test module's own config (`extra_config` added to the tests' config) on
    `stack`'s database and simulator; stopped after, also when the test fails."""
    config = write_app_config(tmp / "tierbatch.toml", stack.simulator_port, extra_config)
    own = Stack(tmp=tmp, database_url=stack.database_url, redis_url=stack.redis_url, config_path=config,
                simulator_port=stack.simulator_port, api_port=free_port())
    try:
        own.start_api()
        own.start_worker()
        own.start_beat()
        yield own
    finally:
        own.stop_all()
        delete_redis_keys(own.redis_prefix)
