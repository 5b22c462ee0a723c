"""Webhooks go only to public addresses, on a stack with the default policy
(`[webhooks] allow_private_networks = false`): the session stack allows private networks for the
other webhook tests' receivers, so this module runs an API, a worker and a beat of its own.

What an attacker tries: a webhook_url naming loopback, private, link-local or metadata addresses in
any spelling, on jobs and schedules (created and changed). Each is a 422 naming `webhook_url`, nothing
is stored, and a real receiver listening on that loopback port gets zero requests. A URL that got
into the database anyway (written before an upgrade, or when the operator allowed private networks)
is refused again when the worker connects: the attempt is recorded as failed, no request is made.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import delete_redis_keys
from tests.integration.test_jobs_api import items, row_counts
from tests.support.procs import free_port, wait_until
from tests.support.stack import SECRET_KEY, Stack, psycopg_dsn, scratch_database, write_app_config
from tests.support.webhooks import Receiver, webhook_receiver
from tierbatch.migrations.runner import upgrade_to_head

pytestmark = pytest.mark.integration

JOB = {"tier": "light", "labels": ["a", "b"], "template": "Ticket: {text}"}


@pytest.fixture(scope="module")
def public_only(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Its own database too: the session stack's worker (private networks allowed) must not deliver the
    webhooks stored here."""
    tmp = Path(tmp_path_factory.mktemp("public-only"))
    simulator_port = free_port()  # never started: nothing here reaches a provider
    config = write_app_config(tmp / "tierbatch.toml", simulator_port,
                              extra="[webhooks]\nallow_private_networks = false\ntimeout_seconds = 3\n")
    with scratch_database(base_database_url, prefix="tierbatch_public_only") as database_url:
        upgrade_to_head(database_url, SECRET_KEY)
        running = Stack(tmp=tmp, database_url=database_url, redis_url=TEST_REDIS_URL, config_path=config,
                        simulator_port=simulator_port, api_port=free_port())
        try:
            running.start_api()
            running.start_worker()
            running.start_beat()
            yield running
        finally:
            running.stop_all()
            delete_redis_keys(running.redis_prefix)


@pytest.fixture(scope="module")
def loopback() -> Iterator[Receiver]:
    """A real receiver on 127.0.0.1: what a hostile tenant aims at. It must never be contacted."""
    with webhook_receiver(path="/_sim/config") as state:
        yield state


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def aimed(receiver: Receiver) -> list[str]:
    """The loopback receiver's URL in the spellings an attacker tries, plus other non-public targets."""
    port = receiver.url.split(":")[2].split("/")[0]
    path = "/_sim/config"
    return [f"http://{host}:{port}{path}" for host in
            ("127.0.0.1", "localhost", "[::1]", "2130706433", "127.1", "[::ffff:127.0.0.1]", "0.0.0.0",
             "0x7f.0.0.1", "127.0.0.1.")] + [
        "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://192.168.1.10/hook",
        "http://[fd00::1]/hook", "http://[fe80::1]/hook", f"http://localhost.:{port}{path}",
    ]


def assert_names_webhook_url(response: Any) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "webhook_url" and error["message"].startswith("webhook_url:"), error


def test_jobs_and_schedules_aimed_at_internal_addresses_are_refused_and_nothing_is_contacted(
        public_only: Stack, loopback: Receiver) -> None:
    stack = public_only
    before = row_counts(stack)
    schedules_before = query(stack, "SELECT count(*) FROM schedules")
    with stack.client(stack.new_tenant_key("attacker")) as client:
        for url in aimed(loopback):
            assert_names_webhook_url(client.post("/v1/jobs", json={**JOB, "items": items(2), "webhook_url": url}))
            schedule = {"name": f"s-{uuid.uuid4().hex[:6]}", "cron": "* * * * *", "timezone": "UTC",
                        "enabled": True, "job": JOB, "webhook_url": url,
                        "source": {"type": "file", "path": "tickets.csv", "id_field": "id", "text_field": "body"}}
            assert_names_webhook_url(client.post("/v1/schedules", json=schedule))
            assert_names_webhook_url(client.patch(f"/v1/schedules/{uuid.uuid4()}", json={"webhook_url": url}))
        # a job without a webhook is still accepted: the refusals were about the URL alone
        fine = client.post("/v1/jobs", json={**JOB, "items": items(1)})
        assert fine.status_code == 202, fine.text
    assert row_counts(stack)[0] == before[0] + 1
    assert query(stack, "SELECT count(*) FROM schedules") == schedules_before
    assert query(stack, "SELECT count(*) FROM jobs WHERE webhook_url IS NOT NULL AND tenant_id IN "
                        "(SELECT id FROM tenants WHERE name = 'attacker')") == [(0,)]
    assert loopback.received == []


def test_a_stored_internal_url_is_refused_when_the_worker_connects(public_only: Stack, loopback: Receiver) -> None:
    """As if the URL had been accepted earlier (before the upgrade, or with private networks allowed):
    the worker resolves and checks again at connect time, records a failed attempt, sends nothing."""
    stack = public_only
    with stack.admin_client() as admin:
        tenant = admin.post("/v1/admin/tenants", json={"name": "old-hooks"}).json()
    job_id = uuid.uuid4()
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:  # a finished job (no tasks) with that URL
        conn.execute("INSERT INTO jobs (id, tenant_id, name, task_type, requested_tier, urgent, spec, webhook_url, "
                     "created_at) VALUES (%s, %s, 'old', 'general', 'light', false, '{}', %s, %s)",
                     (job_id, tenant["id"], loopback.url, datetime.now(UTC)))
    with stack.client(tenant["api_key"]) as client:
        def attempted() -> list[dict[str, Any]] | None:
            hook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
            return hook["attempts"] if hook and hook["attempts"] else None

        attempts = wait_until(attempted, 30, 0.1, "the first attempt recorded")
    assert isinstance(attempts, list)
    first = attempts[0]
    assert first["status_code"] is None and first["error"].startswith("not sent:"), first
    assert "public" in first["error"]
    assert loopback.received == []
