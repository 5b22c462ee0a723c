"""Job webhooks: a bulk job with a `webhook_url` is POSTed once, signed with its tenant's secret, when all
its tasks are terminal; retried with backoff, every attempt recorded; bad URLs are a 422 naming the field.
The receiver's answer is kept nowhere, a slow receiver is cut at the deadline, secrets are encrypted at rest.

The receiver is a real HTTP server in the test (tests/support/webhooks.py) that verifies the Standard
Webhooks signature with the `standardwebhooks` library; the tenant's secret comes from the admin answer
that creates it (or rotates it). The session stack allows private networks (the receiver is on
127.0.0.1); test_webhook_targets.py checks the default, public-only policy on a stack of its own.
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

from tests.integration.test_jobs_api import items, row_counts, wait_for_job
from tests.support.procs import wait_until
from tests.support.stack import SECRET_KEY, Stack, psycopg_dsn, scratch_database
from tests.support.webhooks import Receiver, webhook_receiver
from tierbatch.base.secretbox import SecretBox
from tierbatch.base.states import RequestedTier, TaskStatus, Tier
from tierbatch.db.models import Job, Task
from tierbatch.jobs.webhooks import claim_notification, jobs_to_notify
from tierbatch.migrations.runner import alembic_config, upgrade_to_head
from tierbatch.webhooks.delivery import JOBS, call_to_make

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
    assert got.headers["webhook-id"] == f"msg_{uuid.UUID(job_id).hex}" and got.headers["x-tierbatch-attempt"] == "1"
    assert got.headers["webhook-signature"].startswith("v1,") and "x-tierbatch-signature" not in got.headers
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
    # one webhook-id for the three attempts: a receiver dedupes by it
    assert {r.headers["webhook-id"] for r in receiver.received} == {f"msg_{uuid.UUID(job_id).hex}"}
    assert [r.headers["x-tierbatch-attempt"] for r in receiver.received] == ["1", "2", "3"]
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # exponential backoff: 1 s, then 2 s
    attempts = final["webhook"]["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None
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
            call = call_to_make(session, JOBS, job.id, 1, SecretBox([SECRET_KEY]))
            assert call is not None and call.body == stored.webhook_body.encode() and call.event == "job.finished"
            assert call.secret is not None and call.secret.startswith("whsec_")  # decrypted for the attempt
    finally:
        engine.dispose()


def test_the_migration_gives_every_existing_tenant_its_own_secret_then_encrypts_it(base_database_url: str) -> None:
    with scratch_database(base_database_url, prefix="tierbatch_wh_migration") as url:
        config = alembic_config(url)
        command.upgrade(config, "0003")
        with psycopg.connect(psycopg_dsn(url)) as conn:
            for n in range(3):
                conn.execute("INSERT INTO tenants (id, name, api_key_hash, api_key_prefix) VALUES (%s, %s, %s, %s)",
                             (uuid.uuid4(), f"old-{n}", f"hash-{n}", "tb_"))
        command.upgrade(config, "0007")  # the plain secrets, as they were before encryption
        with psycopg.connect(psycopg_dsn(url)) as conn:
            plain: dict[uuid.UUID, str] = dict(conn.execute("SELECT id, webhook_secret FROM tenants").fetchall())
        assert len(set(plain.values())) == 3
        assert all(s.startswith("whsec_") and len(s) == len("whsec_") + 64 for s in plain.values())

        upgrade_to_head(url, SECRET_KEY)
        box = SecretBox([SECRET_KEY])
        with psycopg.connect(psycopg_dsn(url)) as conn:
            sealed: dict[uuid.UUID, str] = dict(
                conn.execute("SELECT id, webhook_secret_encrypted FROM tenants").fetchall())
            columns = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_name IN ('tenants', 'schedules')").fetchall()}
        assert "webhook_secret" not in columns  # the plain text column is gone
        assert {k: box.open(v) for k, v in sealed.items()} == plain  # the same secrets keep signing
        assert not any(p in s or p.removeprefix("whsec_") in s for p, s in zip(plain.values(), sealed.values(),
                                                                               strict=True))

        command.downgrade(alembic_config(url, SECRET_KEY), "0007")  # and back: decrypted again
        with psycopg.connect(psycopg_dsn(url)) as conn:
            assert dict(conn.execute("SELECT id, webhook_secret FROM tenants").fetchall()) == plain
        upgrade_to_head(url, "")  # without a key: the plain secrets are dropped (rotate after the upgrade)
        with psycopg.connect(psycopg_dsn(url)) as conn:
            assert conn.execute("SELECT count(*) FROM tenants WHERE webhook_secret_encrypted IS NULL"
                                ).fetchone() == (3,)
        command.downgrade(config, "0003")
        upgrade_to_head(url, SECRET_KEY)


def all_text(stack: Stack, table: str) -> str:
    """Every column of every row of a table, as text: what someone with the database would read."""
    rows = query(stack, f"SELECT t::text FROM {table} t")
    return "\n".join(str(r[0]) for r in rows)


def test_the_receivers_answer_is_kept_nowhere_only_its_status(sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    leaked = f"TOPSECRET-{uuid.uuid4().hex}"  # what an internal service would answer
    receiver.answer = f"<html>{leaked} root:x:0:0 </html>".encode()
    receiver.failures = 1
    tenant = new_tenant(stack)
    receiver.secret = tenant["webhook_secret"]
    with stack.client(tenant["api_key"]) as client:
        job_id = client.post("/v1/jobs", json={**JOB, "items": items(2), "webhook_url": receiver.url}).json()["id"]
        wait_for_job(stack, client, job_id)
        final = wait_webhook(stack, client, job_id)
        answers = [client.get(f"/v1/jobs/{job_id}").text, client.get("/v1/jobs").text,
                   client.get(f"/v1/jobs/{job_id}/results").text]
    assert [(a["status_code"], a["error"]) for a in final["webhook"]["attempts"]] == [(500, "HTTP 500"), (200, None)]
    assert all(a["duration_ms"] >= 0 for a in final["webhook"]["attempts"])
    assert len(receiver.received) == 2
    for text in answers:
        assert leaked not in text
    for table in ("webhook_deliveries", "jobs", "tasks"):
        assert leaked not in all_text(stack, table), table


def test_webhook_secrets_are_encrypted_at_rest(stack: Stack) -> None:
    tenant = new_tenant(stack, "at-rest")
    secret = tenant["webhook_secret"]
    [(sealed,)] = query(stack, "SELECT webhook_secret_encrypted FROM tenants WHERE id = %s", tenant["id"])
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert secret not in all_text(stack, "tenants")
    assert SecretBox([SECRET_KEY]).open(sealed) == secret  # sealed with the deployment's key, not hashed
    with stack.admin_client() as admin:
        rotated = admin.post(f"/v1/admin/tenants/{tenant['id']}/webhook-secret").json()["webhook_secret"]
    assert rotated.startswith("whsec_") and rotated != secret
    text = all_text(stack, "tenants")
    assert rotated not in text and rotated.removeprefix("whsec_") not in text


def test_a_slow_receiver_is_cut_at_the_deadline_and_dispatch_goes_on(sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    deadline = 3.0  # [webhooks] timeout_seconds of the session stack's config
    receiver.delay = 20.0
    tenant = new_tenant(stack)
    receiver.secret = tenant["webhook_secret"]
    with stack.client(tenant["api_key"]) as client:
        slow = client.post("/v1/jobs", json={**JOB, "items": items(1), "webhook_url": receiver.url}).json()["id"]
        wait_for_job(stack, client, slow)

        def first_attempt() -> dict[str, Any] | None:
            hook = client.get(f"/v1/jobs/{slow}").json()["webhook"]
            return hook["attempts"][0] if hook and hook["attempts"] else None

        attempt = wait_until(first_attempt, 30, 0.1, "the first attempt recorded")
        assert isinstance(attempt, dict)
        assert attempt["status_code"] is None and attempt["error"].startswith("timed out"), attempt
        assert deadline * 1000 * 0.9 <= attempt["duration_ms"] < deadline * 1000 + 2000, attempt
        # the webhook retries wait on their own queue: other tenants' work runs meanwhile
        other = client.post("/v1/jobs", json={**JOB, "items": items(3, "other")}).json()["id"]
        assert wait_for_job(stack, client, other)["counts"] == {"succeeded": 3}
        receiver.delay = 0.0  # the receiver recovers: a later attempt is delivered
        final = wait_webhook(stack, client, slow, timeout=60)
    assert final["webhook"]["attempts"][-1]["status_code"] == 200
