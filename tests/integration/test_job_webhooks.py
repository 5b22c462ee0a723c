"""Job webhooks: a bulk job with a `webhook_url` is POSTed once, signed with its tenant's secret, when all
its tasks are terminal; retried with backoff, every attempt recorded; bad URLs are a 422 naming the field.

The receiver is a real HTTP server in the test (tests/support/webhooks.py); the tenant's secret comes from
the admin answer that creates it (or rotates it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, pool, select
from sqlalchemy.orm import Session

from core.job_webhooks import claim_notification, jobs_to_notify
from core.migrate import alembic_config, upgrade_to_head
from core.models import Job, Task
from core.states import RequestedTier, TaskStatus, Tier
from core.webhooks import JOBS, call_to_make
from tests.integration.test_jobs_api import items, row_counts, wait_for_job
from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn, scratch_database
from tests.support.webhooks import Receiver, webhook_receiver

pytestmark = pytest.mark.integration

LABELS = ["billing", "account", "bug"]
JOB = {"tier": "light", "urgent": True, "labels": LABELS, "template": "Ticket: {text}"}
BEAT_TICK_SECONDS = 0.5  # the test config's poll interval: the job webhook tick runs this often


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as state:
        yield state


def new_tenant(stack: Stack, name: str = "hooks") -> dict[str, Any]:
    with stack.admin_client() as admin:
        response = admin.post("/v1/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
    assert body["webhook_secret"].startswith("whsec_") and len(body["webhook_secret"]) > 40
    return body


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def wait_webhook(stack: Stack, client: httpx.Client, job_id: str, status: str = "delivered",
                 timeout: float = 30.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["webhook"] is not None and body["webhook"]["status"] == status else None

    try:
        return wait_until(reached, timeout, 0.1, f"job {job_id} webhook {status}")  # type: ignore[return-value]
    except TimeoutError:
        last = client.get(f"/v1/jobs/{job_id}").json()
        raise AssertionError(f"webhook never {status}; last: {last}\nworker log:\n"
                             f"{stack.processes['worker'].log_text()[-5000:]}") from None


def test_a_finished_job_is_posted_once_signed_with_the_tenant_secret(sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    tenant = new_tenant(stack)
    receiver.secret = tenant["webhook_secret"]
    with stack.client(tenant["api_key"]) as client:
        answer = client.post("/v1/jobs", json={**JOB, "name": "hooked", "items": items(6),
                                               "webhook_url": receiver.url})
        assert answer.status_code == 202, answer.text
        created = answer.json()
        assert created["webhook_url"] == receiver.url
        job_id = created["id"]
        job = wait_for_job(stack, client, job_id)
        final = wait_webhook(stack, client, job_id)
        time.sleep(6 * BEAT_TICK_SECONDS)  # more ticks: nothing else is sent
        assert len(receiver.received) == 1

        # appending after the notification: accepted and run, never notified again (documented)
        more = client.post("/v1/jobs", json={"name": "hooked", "items": items(2, "late")})
        assert more.status_code == 202 and more.json()["id"] == job_id
        after = wait_for_job(stack, client, job_id)
        assert after["counts"] == {"succeeded": 8}
        time.sleep(6 * BEAT_TICK_SECONDS)

    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.signature_ok
    assert got.headers["x-tierbatch-event"] == "job.finished"
    assert got.headers["x-tierbatch-delivery"] == f"{job_id}:1"
    assert got.headers["content-type"] == "application/json"

    payload = json.loads(got.body)
    assert payload["event"] == "job.finished" and payload["job_id"] == job_id and payload["name"] == "hooked"
    assert payload["status"] == "completed"
    assert payload["counts"] == job["counts"] == {"succeeded": 6} and payload["task_count"] == 6
    for key in ("cost_usd", "baseline_cost_usd", "savings_usd", "finished_at", "created_at"):
        assert payload[key] == job[key], key
    cost, baseline = Decimal(payload["cost_usd"]), Decimal(payload["baseline_cost_usd"])
    assert cost > 0 and Decimal(payload["savings_usd"]) == baseline - cost > 0
    assert payload["results_url"] == f"/v1/jobs/{job_id}/results"

    assert final["webhook_url"] == receiver.url
    assert [(a["attempt"], a["status_code"], a["error"]) for a in final["webhook"]["attempts"]] == [(1, 200, None)]
    assert query(stack, "SELECT count(*) FROM webhook_deliveries WHERE job_id = %s", job_id) == [(1,)]
    notified = query(stack, "SELECT finished_notified_at IS NOT NULL, webhook_status FROM jobs WHERE id = %s", job_id)
    assert notified == [(True, "delivered")]


def test_a_failing_receiver_gets_retries_with_backoff_and_every_attempt_is_recorded(
        sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    receiver.failures = 2
    tenant = new_tenant(stack)
    receiver.secret = tenant["webhook_secret"]
    with stack.client(tenant["api_key"]) as client:
        created = client.post("/v1/jobs", json={**JOB, "items": items(3), "webhook_url": receiver.url}).json()
        job_id = created["id"]
        wait_for_job(stack, client, job_id)
        final = wait_webhook(stack, client, job_id)

    assert len(receiver.received) == 3
    assert all(r.signature_ok for r in receiver.received)
    assert len({r.body for r in receiver.received}) == 1  # the same bytes, signed the same way, every time
    assert [r.headers["x-tierbatch-delivery"] for r in receiver.received] == [f"{job_id}:{n}" for n in (1, 2, 3)]
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # exponential backoff: 1 s, then 2 s
    attempts = final["webhook"]["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert attempts[0]["error"].startswith("HTTP 500") and attempts[2]["error"] is None
    assert query(stack, "SELECT attempt, status_code FROM webhook_deliveries WHERE job_id = %s ORDER BY attempt",
                 job_id) == [(1, 500), (2, 500), (3, 200)]


BAD_URLS: list[tuple[str, Any]] = [
    ("ftp scheme", "ftp://example.com/hook"),
    ("not a url", "not a url"),
    ("no host", "http://"),
    ("empty", ""),
    ("a number", 42),
    ("an object", {"url": "https://example.com"}),
    ("too long", "https://example.com/" + "x" * 3000),
]


@pytest.mark.parametrize(("label", "url"), BAD_URLS, ids=[b[0] for b in BAD_URLS])
def test_a_bad_webhook_url_is_a_422_naming_the_field_and_stores_nothing(stack: Stack, label: str, url: Any) -> None:
    before = row_counts(stack)
    with stack.client(stack.new_tenant_key()) as client:
        response = client.post("/v1/jobs", json={"name": "bad", "webhook_url": url, "items": items(2)})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "webhook_url" and error["message"].startswith("webhook_url:"), error
    assert row_counts(stack) == before


def test_appending_by_name_may_repeat_the_webhook_url_but_not_change_it(stack: Stack, receiver: Receiver) -> None:
    tenant = new_tenant(stack)
    receiver.secret = tenant["webhook_secret"]
    other = receiver.url + "/other"
    with stack.client(tenant["api_key"]) as client:
        first = client.post("/v1/jobs", json={**JOB, "name": "n", "webhook_url": receiver.url, "items": items(1)})
        assert first.status_code == 202, first.text
        before = row_counts(stack)
        changed = client.post("/v1/jobs", json={"name": "n", "webhook_url": other, "items": items(1, "b")})
        assert changed.status_code == 409 and changed.json()["error"]["param"] == "webhook_url", changed.text
        assert row_counts(stack) == before
        same = client.post("/v1/jobs", json={"name": "n", "webhook_url": receiver.url, "items": items(1, "c")})
        assert same.status_code == 202 and same.json()["id"] == first.json()["id"]
        left_out = client.post("/v1/jobs", json={"name": "n", "items": items(1, "d")})
        assert left_out.status_code == 202 and left_out.json()["webhook_url"] == receiver.url

        plain = client.post("/v1/jobs", json={**JOB, "name": "plain", "items": items(1)})
        assert plain.status_code == 202 and plain.json()["webhook_url"] is None
        late = client.post("/v1/jobs", json={"name": "plain", "webhook_url": receiver.url, "items": items(1, "e")})
        assert late.status_code == 409 and late.json()["error"]["param"] == "webhook_url"
        wait_webhook(stack, client, first.json()["id"])


def test_a_job_without_webhook_url_sends_nothing_and_a_rotated_secret_signs_the_next_ones(
        sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    tenant = new_tenant(stack)
    with stack.client(tenant["api_key"]) as client:
        quiet = client.post("/v1/jobs", json={**JOB, "items": items(3)}).json()
        assert quiet["webhook_url"] is None
        done = wait_for_job(stack, client, quiet["id"])
        assert done["webhook_url"] is None and done["webhook"] is None

        with stack.admin_client() as admin:
            rotated = admin.post(f"/v1/admin/tenants/{tenant['id']}/webhook-secret")
            assert rotated.status_code == 200, rotated.text
            assert admin.post(f"/v1/admin/tenants/{uuid.uuid4()}/webhook-secret").status_code == 404
            assert admin.post("/v1/admin/tenants/nope/webhook-secret").status_code == 404
        assert client.post(f"/v1/admin/tenants/{tenant['id']}/webhook-secret").status_code == 401
        secret = rotated.json()["webhook_secret"]
        assert secret.startswith("whsec_") and secret != tenant["webhook_secret"]
        receiver.secret = secret

        hooked = client.post("/v1/jobs", json={**JOB, "items": items(2), "webhook_url": receiver.url}).json()
        wait_for_job(stack, client, hooked["id"])
        wait_webhook(stack, client, hooked["id"])
        time.sleep(4 * BEAT_TICK_SECONDS)

    assert len(receiver.received) == 1 and receiver.received[0].signature_ok  # signed with the new secret
    assert json.loads(receiver.received[0].body)["job_id"] == hooked["id"]
    assert query(stack, "SELECT finished_notified_at, webhook_status FROM jobs WHERE id = %s",
                 quiet["id"]) == [(None, None)]
    assert query(stack, "SELECT count(*) FROM webhook_deliveries WHERE job_id = %s", quiet["id"]) == [(0,)]


def test_the_claim_is_taken_once_and_only_when_no_task_is_live(stack: Stack) -> None:
    """The claim itself, in one transaction that is rolled back: the beat never sees these rows."""
    tenant_id = uuid.UUID(new_tenant(stack)["id"])
    engine = create_engine(stack.database_url, poolclass=pool.NullPool)
    try:
        with Session(engine) as session:  # never committed: closing it rolls everything back
            job = Job(id=uuid.uuid4(), tenant_id=tenant_id, name="claim", task_type="general",
                      requested_tier=RequestedTier.LIGHT, urgent=False, spec={},
                      webhook_url="http://127.0.0.1:9/hook")
            session.add(job)
            session.flush()
            task = Task(id=uuid.uuid4(), tenant_id=tenant_id, job_id=job.id, item_id="1", task_type="general",
                        requested_tier=RequestedTier.LIGHT, tier=Tier.LIGHT, tier_reason="test", urgent=False,
                        request={"messages": [{"role": "user", "content": "x"}]}, status=TaskStatus.WAITING_BATCH)
            session.add(task)
            session.flush()
            assert job.id not in jobs_to_notify(session, limit=10_000)
            assert claim_notification(session, job.id) is False  # a live task: not finished

            task.status = TaskStatus.CANCELLED
            task.finished_at = datetime.now(UTC)
            session.flush()
            assert job.id in jobs_to_notify(session, limit=10_000)
            assert claim_notification(session, job.id) is True
            assert claim_notification(session, job.id) is False  # claimed once, whoever runs it again
            assert job.id not in jobs_to_notify(session, limit=10_000)

            stored = session.execute(select(Job.webhook_status, Job.webhook_body, Job.finished_notified_at)
                                     .where(Job.id == job.id)).one()
            assert stored.webhook_status == "pending" and stored.finished_notified_at is not None
            body = json.loads(stored.webhook_body)
            assert body["counts"] == {"cancelled": 1} and body["cost_usd"] == "0"
            call = call_to_make(session, JOBS, job.id, 1)
            assert call is not None and call.body == stored.webhook_body.encode() and call.event == "job.finished"
    finally:
        engine.dispose()


def test_the_migration_gives_every_existing_tenant_its_own_secret(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_wh_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0003")
        with psycopg.connect(psycopg_dsn(url)) as conn:
            for n in range(3):
                conn.execute("INSERT INTO tenants (id, name, api_key_hash, api_key_prefix) VALUES (%s, %s, %s, %s)",
                             (uuid.uuid4(), f"old-{n}", f"hash-{n}", "tb_"))
        upgrade_to_head(url)
        with psycopg.connect(psycopg_dsn(url)) as conn:
            secrets = [row[0] for row in conn.execute("SELECT webhook_secret FROM tenants").fetchall()]
        assert len(secrets) == 3 and len(set(secrets)) == 3
        assert all(s.startswith("whsec_") and len(s) == len("whsec_") + 64 for s in secrets)
        command.downgrade(config, "0003")  # and back: the downgrade leaves the 0003 schema
        upgrade_to_head(url)
