"""SIGKILL of a worker mid-call: the lease expires, the reconciler re-dispatches, the task completes once."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration


def test_worker_killed_during_a_call_completes_once_after_restart(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [2500, 2500]}}})
    try:
        with stack.client(stack.new_tenant_key()) as client:
            accepted = client.post("/v1/tasks", json={"prompt": "Design a schema", "tier": "complex"}).json()
            stack.wait_for_task(client, accepted["id"], {"running"}, timeout=20)
            # the call is in flight at the simulator: kill the worker as a crash would
            stack.processes["worker"].kill()
            assert client.get(f"/v1/tasks/{accepted['id']}").json()["status"] == "running"

            stack.start_worker()
            task = stack.wait_for_task(client, accepted["id"], {"succeeded", "failed"}, timeout=60)
        assert task["status"] == "succeeded", task
        assert task["attempts"] == 2
        with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
            row = conn.execute("SELECT count(*), sum(cost_usd) FROM ledger_entries WHERE task_id = %s",
                               (accepted["id"],)).fetchone()
        assert row is not None
        assert row[0] == 1
        assert str(row[1].normalize()) == task["cost_usd"]
    finally:
        stack.sim("POST", "/_sim/config", {"models": {"gpt-4o": {"latency_ms": [5, 20]}}})
