"""The immediate path end to end: API → Celery worker → simulator over HTTP → Postgres."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest
from genai_prices import Usage, calc_price

from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

CENT_MILLIONTH = Decimal("0.00000001")


def ledger_rows(stack: Stack, task_id: str) -> list[dict[str, object]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT mode::text, requested_model, served_model, input_tokens, cached_tokens, "
                    "output_tokens, cost_usd, baseline_cost_usd, unpriced FROM ledger_entries "
                    "WHERE task_id = %s ORDER BY id", (task_id,))
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def genai_cost(model: str, usage: dict[str, int]) -> Decimal:
    price = calc_price(Usage(input_tokens=usage["input_tokens"], cache_read_tokens=usage["cached_tokens"],
                             output_tokens=usage["output_tokens"]), model_ref=model, provider_id="openai")
    return price.total_price


def test_complex_and_urgent_light_tasks_succeed_with_priced_ledger_rows(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key()) as client:
        complex_task = client.post("/v1/tasks", json={
            "prompt": "Explain the trade-offs of event sourcing for an invoicing system.", "tier": "complex"})
        light_task = client.post("/v1/tasks", json={
            "messages": [{"role": "user", "content": "Say hi"}], "tier": "light", "urgent": True})
        assert complex_task.status_code == 202, complex_task.text
        assert light_task.status_code == 202, light_task.text
        assert complex_task.json()["tier"] == "complex"
        assert light_task.json()["tier"] == "light"

        for accepted, asked_model in ((complex_task.json(), "gpt-4o"), (light_task.json(), "gpt-4o-mini")):
            task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"})
            assert task["status"] == "succeeded", task
            assert task["mode"] == "immediate"
            assert task["model"] == asked_model
            assert task["served_model"] == task["response"]["model"]
            assert task["served_model"].startswith(asked_model)
            assert task["output"]
            usage = task["usage"]
            assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
            expected = genai_cost(task["served_model"], usage)
            assert Decimal(task["cost_usd"]).quantize(CENT_MILLIONTH) == expected.quantize(CENT_MILLIONTH)
            assert task["finished_at"] is not None

            rows = ledger_rows(stack, accepted["id"])
            assert len(rows) == 1
            assert rows[0]["mode"] == "immediate"
            assert rows[0]["served_model"] == task["served_model"]
            assert rows[0]["cost_usd"] == Decimal(task["cost_usd"])
            assert rows[0]["unpriced"] is False
            baseline = genai_cost("gpt-4o", usage)
            assert Decimal(task["baseline_cost_usd"]).quantize(CENT_MILLIONTH) == baseline.quantize(CENT_MILLIONTH)


def test_non_urgent_light_task_waits_for_a_batch(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key()) as client:
        accepted = client.post("/v1/tasks", json={"prompt": "Label this: great product",
                                                  "task_type": "classification"}).json()
        assert accepted["tier"] == "light"
        task = stack.wait_for_task(client, accepted["id"], {"waiting_batch"})
        assert task["model"] == "gpt-4o-mini"
        assert ledger_rows(stack, accepted["id"]) == []
    assert sim_reset.sim("GET", "/_sim/stats")["chat_calls"].get("gpt-4o-mini", 0) == 0


@pytest.mark.parametrize("status", [429, 500])
def test_failing_primary_falls_back_and_the_ledger_names_the_fallback(sim_reset: Stack, status: int) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 1.0, "error_status": status,
                                                             "retry_after_seconds": 0.05}}})
    try:
        with stack.client(stack.new_tenant_key()) as client:
            accepted = client.post("/v1/tasks", json={"prompt": "Plan a migration", "tier": "complex"}).json()
            task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"})
        assert task["status"] == "succeeded", task
        assert task["model"] == "gpt-4.1"
        assert task["served_model"].startswith("gpt-4.1")
        rows = ledger_rows(stack, accepted["id"])
        assert [r["served_model"] for r in rows] == [task["served_model"]]
        calls = stack.sim("GET", "/_sim/stats")["chat_calls"]
        assert calls["gpt-4o"] >= 2  # retried before falling back
    finally:
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 0.0}}})


@pytest.mark.parametrize("status", [400, 503])
def test_every_model_failing_ends_failed_with_a_readable_error(sim_reset: Stack, status: int) -> None:
    stack = sim_reset
    failing = {"error_rate": 1.0, "error_status": status, "retry_after_seconds": 0.05}
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": failing, "gpt-4.1": failing}})
    try:
        with stack.client(stack.new_tenant_key()) as client:
            accepted = client.post("/v1/tasks", json={"prompt": "Plan a migration", "tier": "complex"}).json()
            task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"}, timeout=60)
        assert task["status"] == "failed"
        assert f"HTTP {status}" in task["error"]
        assert "gpt-4o" in task["error"] and "gpt-4.1" in task["error"]
        assert task["cost_usd"] is None
        assert ledger_rows(stack, accepted["id"]) == []
        # bounded: a permanent error is one attempt, a retryable one at most max_attempts (3)
        assert task["attempts"] == (1 if status == 400 else 3)
        calls = stack.sim("GET", "/_sim/stats")["chat_calls"]
        per_attempt = 1 if status == 400 else 2  # retries_per_model = 1
        assert calls["gpt-4o"] == task["attempts"] * per_attempt
    finally:
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"error_rate": 0.0},
                                                      "gpt-4.1": {"error_rate": 0.0}}})
