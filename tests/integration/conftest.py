from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from openai import OpenAI
from sqlalchemy.orm import Session

from tests.conftest import TEST_REDIS_URL
from tests.support.procs import free_port, wait_until
from tests.support.stack import (
    SESSION_SOURCES,
    Stack,
    delete_redis_keys,
    psycopg_dsn,
    scratch_database,
    write_app_config,
)
from tierbatch.cli.stack.open_model import OpenModelServer, OpenModelSpec, OpenModelUnavailable, server_command
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.migrations.runner import upgrade_to_head

# the session's llama-server: 4 slots of 512 tokens each (a slot's context is the total over the slots), so
# the server could take more calls at once than the background lane's bound lets it have
OPEN_MODEL_SLOTS = 4
OPEN_MODEL_CONTEXT = 2048


@pytest.fixture(scope="session")
def migrated_database_url(base_database_url: str) -> Iterator[str]:
    """One database for this test run, migrated to head, dropped at the end."""
    with scratch_database(base_database_url) as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture(scope="session")
def stack(migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Simulator, API, worker and beat as real processes, for the whole run."""
    tmp = tmp_path_factory.mktemp("stack")
    simulator_port = free_port()
    config_path = write_app_config(Path(tmp) / "tierbatch.toml", simulator_port, SESSION_SOURCES)
    running = Stack(tmp=Path(tmp), database_url=migrated_database_url, redis_url=TEST_REDIS_URL,
                    config_path=config_path, simulator_port=simulator_port, api_port=free_port())
    try:
        running.start_simulator()
        running.start_api()
        running.start_worker()
        running.start_beat()
        yield running
    finally:
        running.stop_all()
        delete_redis_keys(running.redis_prefix)


SIM_DEFAULTS: dict[str, Any] = {"*": {"error_rate": 0.0, "latency_ms": [5, 20], "slow_rate": 0.0}}
SIM_BATCH_DEFAULTS: dict[str, Any] = {
    "validating_seconds": 0.1, "in_progress_seconds": 0.3, "finalizing_seconds": 0.1, "line_error_rate": 0.0,
    "expire": False, "enqueued_token_limit": 0, "max_lines": 50_000,
}


def _reset_simulator(stack: Stack) -> None:
    current = stack.sim("POST", "/_sim/config", {})
    # null removes a model's own table: every model falls back to the "*" defaults
    patch: dict[str, Any] = {name: None for name in current["models"] if name != "*"}
    stack.sim("POST", "/_sim/config", {"models": {**patch, **SIM_DEFAULTS}, "batch": SIM_BATCH_DEFAULTS})
    stack.sim("POST", "/_sim/reset")


def _wait_for_quiet(stack: Stack, timeout: float = 60.0) -> None:
    """Let work left by earlier tests finish, so this test's simulator stats count only its own calls.
    Goes on after the deadline: a test that needs a quiet system asserts on its own figures."""
    dsn = psycopg_dsn(stack.database_url)

    def quiet() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM tasks WHERE status IN ('queued', 'waiting_batch', 'in_batch', "
                "'running')) + (SELECT count(*) FROM provider_batches WHERE status NOT IN ('done', 'failed'))"
            ).fetchone()
        return row is not None and row[0] == 0

    with contextlib.suppress(TimeoutError):
        wait_until(quiet, timeout, 0.2, "no live tasks or batches")


@pytest.fixture
def session(migrated_database_url: str) -> Iterator[Session]:
    """A session on the migrated test database whose work is rolled back after the test."""
    engine = make_engine(migrated_database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            try:
                yield session
            finally:
                session.rollback()
    finally:
        engine.dispose()


@pytest.fixture
def sim_reset(stack: Stack) -> Iterator[Stack]:
    """Simulator defaults and zeroed stats before the test, defaults again after it."""
    _wait_for_quiet(stack)
    _reset_simulator(stack)
    yield stack
    _reset_simulator(stack)


@pytest.fixture
def openai_sdk(stack: Stack) -> Iterator[Callable[[str], OpenAI]]:
    """`openai_sdk(tenant_key)`: an OpenAI SDK client on the session stack's API (no SDK retries: the test
    sees every status as it is); all closed after the test."""
    clients: list[OpenAI] = []

    def make(key: str) -> OpenAI:
        client = OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def open_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenModelServer]:
    """llama-server with SmolLM2-135M (tierbatch.cli.stack.open_model), started once for the run. Skipped, with
    the reason printed, only where the binary or the model is not installed; `make test` sets
    TIERBATCH_REQUIRE_OPEN_MODEL, and there a missing server fails the tests instead."""
    spec = OpenModelSpec(free_port(), context_size=OPEN_MODEL_CONTEXT, parallel=OPEN_MODEL_SLOTS)
    try:
        server_command(spec)
    except OpenModelUnavailable as exc:
        if os.environ.get("TIERBATCH_REQUIRE_OPEN_MODEL"):
            pytest.fail(f"the open model must run here (TIERBATCH_REQUIRE_OPEN_MODEL is set): {exc}")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"open-model tests skipped: {exc}", yellow=True)
        pytest.skip(f"open model not installed: {exc}")
    log_path = Path(tmp_path_factory.mktemp("open-model")) / "llama-server.log"
    with OpenModelServer(spec, log_path) as server:
        yield server
