"""The run webhook: a signed POST, retried with backoff when the receiver fails, every attempt recorded.

The receiver is a small HTTP server in the test; it verifies the Standard Webhooks headers with the
`standardwebhooks` library and the schedule's secret (returned once at creation, stored encrypted),
answers 500 twice, then 200.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_schedules import (
    JOB,
    file_schedule,
    query,
    run_now,
    tenant_with_home,
    wait_run,
    write_tickets,
)
from tests.support.procs import wait_until
from tests.support.stack import SECRET_KEY, Stack
from tests.support.webhooks import Receiver, webhook_receiver
from tierbatch.base.secretbox import SecretBox

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(failures=2, path="/hooks/tickets") as state:
        yield state


def test_signed_webhook_is_retried_with_backoff_and_every_attempt_recorded(
        sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    key, home = tenant_with_home(stack)
    write_tickets(home / "t.csv", 5)
    with stack.client(key) as client:
        schedule = file_schedule(client, "t.csv", job={**JOB, "urgent": True},
                                 webhook_url=receiver.url)
        receiver.secret = schedule["webhook_secret"]
        assert "webhook_secret" not in client.get(f"/v1/schedules/{schedule['id']}").json()
        run = run_now(client, schedule["id"])
        done = wait_run(stack, client, schedule["id"], run["id"])
        assert done["status"] == "succeeded"

        def delivered() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/schedules/{schedule['id']}/runs/{run['id']}").json()
            return body if body["webhook"]["status"] == "delivered" else None

        final = wait_until(delivered, 30, 0.2, "webhook delivered")
        assert isinstance(final, dict)

    assert len(receiver.received) == 3
    assert all(r.signature_ok for r in receiver.received)
    assert len({r.body for r in receiver.received}) == 1  # the same bytes, signed the same way, every time
    assert {r.headers["webhook-id"] for r in receiver.received} == {f"msg_{uuid.UUID(run['id']).hex}"}
    assert [r.headers["x-tierbatch-attempt"] for r in receiver.received] == ["1", "2", "3"]
    assert {r.headers["x-tierbatch-event"] for r in receiver.received} == {"schedule_run.finished"}
    assert {r.headers["content-type"] for r in receiver.received} == {"application/json"}
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # exponential backoff: 1 s, then 2 s

    payload = json.loads(receiver.received[0].body)
    assert payload["type"] == "schedule_run.finished"
    assert payload["schedule"] == {"id": schedule["id"], "name": schedule["name"]}
    assert payload["run"]["id"] == run["id"] and payload["run"]["status"] == "succeeded"
    assert payload["run"]["task_count"] == 5 and sum(payload["run"]["label_counts"].values()) == 5
    assert payload["results_url"] == f"/v1/jobs/{done['job_id']}/results"

    attempts = final["webhook"]["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None
    assert query(stack, "SELECT count(*) FROM webhook_deliveries WHERE run_id = %s", run["id"]) == [(3,)]

    # the signing secret is stored encrypted: the database never holds it in plain text
    secret = schedule["webhook_secret"]
    [(sealed,)] = query(stack, "SELECT webhook_secret_encrypted FROM schedules WHERE id = %s", schedule["id"])
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert SecretBox([SECRET_KEY]).open(sealed) == secret
    [(row,)] = query(stack, "SELECT s::text FROM schedules s WHERE id = %s", schedule["id"])
    assert secret.removeprefix("whsec_") not in row


def test_a_failed_run_is_reported_by_the_webhook_too(sim_reset: Stack, receiver: Receiver) -> None:
    stack = sim_reset
    receiver.failures = 0
    with stack.client(stack.new_tenant_key()) as client:
        schedule = file_schedule(client, "missing.csv", webhook_url=receiver.url)
        receiver.secret = schedule["webhook_secret"]
        run = run_now(client, schedule["id"])
        failed = wait_run(stack, client, schedule["id"], run["id"])
        assert failed["status"] == "failed" and "does not exist" in failed["error"]
        wait_until(lambda: len(receiver.received) == 1, 20, 0.1, "the webhook")
    payload = json.loads(receiver.received[0].body)
    assert receiver.received[0].signature_ok
    assert payload["run"]["status"] == "failed" and payload["run"]["error"] == failed["error"]
    assert payload["results_url"] is None
