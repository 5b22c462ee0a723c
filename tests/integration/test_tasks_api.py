"""The native task API: authentication, isolation, idempotency, bad input, listing, cancel."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration


def tenant_task_count(stack: Stack, client: httpx.Client) -> int:
    body = client.get("/v1/tasks", params={"limit": 1000}).json()
    return len(body["data"])


def total_task_rows(stack: Stack) -> int:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        return int(row[0]) if row else 0


def test_missing_or_invalid_key_is_401(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api_url) as anonymous:
        response = anonymous.post("/v1/tasks", json={"prompt": "hi"})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with stack.client("tb_not-a-real-key") as wrong:
        assert wrong.get("/v1/tasks").status_code == 401
    with stack.client("x") as wrong, httpx.Client(base_url=stack.api_url) as anonymous:
        assert wrong.post("/v1/admin/tenants", json={"name": "nope"}).status_code == 401
        assert anonymous.post("/v1/admin/tenants", json={"name": "nope"}).status_code == 401


def test_another_tenants_task_is_404(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key("a")) as alice, stack.client(stack.new_tenant_key("b")) as bob:
        task_id = alice.post("/v1/tasks", json={"prompt": "mine", "tier": "light"}).json()["id"]
        assert alice.get(f"/v1/tasks/{task_id}").status_code == 200
        response = bob.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
        assert bob.post(f"/v1/tasks/{task_id}/cancel").status_code == 404
        assert all(t["id"] != task_id for t in bob.get("/v1/tasks").json()["data"])
        assert bob.get("/v1/tasks/not-a-uuid").status_code == 404


def test_same_idempotency_key_twice_gives_one_task(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key()) as client:
        body = {"prompt": "classify me", "idempotency_key": "order-42", "task_type": "classification"}
        first = client.post("/v1/tasks", json=body)
        second = client.post("/v1/tasks", json=body)
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        batch = client.post("/v1/tasks", json={"tasks": [body, {**body, "idempotency_key": "order-43"}, body]})
        ids = [t["id"] for t in batch.json()["data"]]
        assert ids[0] == ids[2] == first.json()["id"] and ids[1] != ids[0]
        assert tenant_task_count(stack, client) == 2
    with stack.client(stack.new_tenant_key()) as other:
        # keys are per tenant: the same key elsewhere is a different task
        assert other.post("/v1/tasks", json=body).json()["id"] != first.json()["id"]


BAD_INPUTS: list[tuple[str, Any, int, str | None]] = [
    ("no messages and no prompt", {"task_type": "x"}, 422, None),
    ("unknown tier", {"prompt": "hi", "tier": "premium"}, 422, "tier"),
    ("non-string metadata", {"prompt": "hi", "metadata": {"team": 7}}, 422, "metadata.team"),
    ("unknown params key", {"prompt": "hi", "params": {"frequency_penalty": 1}}, 422, "params.frequency_penalty"),
    ("unknown top-level key", {"prompt": "hi", "colour": "red"}, 422, "colour"),
    ("bad deadline", {"prompt": "hi", "deadline": "tomorrow"}, 422, "deadline"),
    ("empty task list", {"tasks": []}, 422, "tasks"),
    ("bad item in a list", {"tasks": [{"prompt": "ok"}, {"prompt": "ok", "tier": "x"}]}, 422, "tasks[1].tier"),
    ("over 1,000 tasks", {"tasks": [{"prompt": "p"}] * 1001}, 413, "tasks"),
    ("prompt over 1 MiB", {"prompt": "x" * (1024 * 1024 + 10)}, 413, "prompt"),
]


@pytest.mark.parametrize(("label", "body", "status", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_naming_the_field_and_stores_nothing(
        stack: Stack, label: str, body: Any, status: int, param: str | None) -> None:
    before = total_task_rows(stack)
    with stack.client(stack.new_tenant_key()) as client:
        response = client.post("/v1/tasks", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"]
        if param is not None:
            assert error["param"] == param
            assert param in error["message"]
        else:
            assert "messages" in error["message"] and "prompt" in error["message"]
        assert tenant_task_count(stack, client) == 0
    assert total_task_rows(stack) == before


def test_malformed_json_is_400(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key()) as client:
        response = client.post("/v1/tasks", content=b'{"prompt": "hi"', headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert "JSON" in response.json()["error"]["message"]
        assert "Traceback" not in response.text
        assert tenant_task_count(stack, client) == 0


def test_list_filters_and_paginates(stack: Stack) -> None:
    with stack.client(stack.new_tenant_key()) as client:
        tasks = [{"prompt": f"task {i}", "task_type": "classification" if i % 2 else "summarization"}
                 for i in range(5)]
        created = [t["id"] for t in client.post("/v1/tasks", json={"tasks": tasks}).json()["data"]]
        seen: list[str] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if after:
                params["after"] = after
            page = client.get("/v1/tasks", params=params).json()
            seen += [t["id"] for t in page["data"]]
            assert len(page["data"]) <= 2
            if not page["has_more"]:
                assert page["next"] is None
                break
            after = page["next"]
        assert sorted(seen) == sorted(created) and len(seen) == len(set(seen))
        only = client.get("/v1/tasks", params={"task_type": "classification"}).json()["data"]
        assert {t["id"] for t in only} == {created[1], created[3]}
        assert client.get("/v1/tasks", params={"status": "bogus"}).status_code == 422


def test_cancel_a_waiting_task_and_not_a_finished_one(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key()) as client:
        waiting = client.post("/v1/tasks", json={"prompt": "label it", "task_type": "classification"}).json()
        stack.wait_for_task(client, waiting["id"], {"waiting_batch"})
        cancelled = client.post(f"/v1/tasks/{waiting['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["finished_at"] is not None

        urgent = client.post("/v1/tasks", json={"prompt": "hi", "tier": "light", "urgent": True}).json()
        stack.wait_for_task(client, urgent["id"], {"succeeded"})
        again = client.post(f"/v1/tasks/{urgent['id']}/cancel")
        assert again.status_code == 409
        assert "succeeded" in again.json()["error"]["message"]


def test_producer_submits_through_the_broker_without_http(sim_reset: Stack) -> None:
    from tierbatch.base.messaging import SUBMIT_TASKS, make_producer
    from tierbatch.base.settings import Settings

    stack = sim_reset
    key = stack.new_tenant_key()
    producer = make_producer(Settings(REDIS_URL=stack.redis_url,  # type: ignore[call-arg]
                                      TIERBATCH_REDIS_PREFIX=stack.redis_prefix))
    try:
        producer.send_task(SUBMIT_TASKS, args=[
            {"tasks": [{"prompt": "Say hi", "tier": "light", "urgent": True, "idempotency_key": "via-broker"}]},
            key,
        ])
    finally:
        producer.close()
    with stack.client(key) as client:
        def find() -> dict[str, Any] | None:
            data = client.get("/v1/tasks").json()["data"]
            return data[0] if data else None

        from tests.support.procs import wait_until

        found = wait_until(find, 20, 0.1, "task submitted through the broker")
        assert isinstance(found, dict)
        task = stack.wait_for_task(client, found["id"], {"succeeded"})
        assert task["served_model"].startswith("gpt-4o-mini")
        assert json.dumps(task["usage"])
