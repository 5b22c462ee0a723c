"""Crashes on the batch path: SIGKILL of the worker at each risky step, and a Redis
wipe while tasks are queued. Afterwards nothing is lost, submitted twice or billed twice."""

from __future__ import annotations

import pytest

from tests.integration.conftest import delete_redis_keys
from tests.integration.test_batch_path import (
    assert_no_double_billing,
    query,
    submit_light,
    tenant_id_of,
    wait_all_terminal,
)
from tests.support.procs import wait_until
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("step", "count"), [("after_upload", 50), ("after_create", 50), ("mid_ingest", 3000)])
def test_worker_killed_at_a_batch_step_loses_and_duplicates_nothing(sim_reset: Stack, step: str, count: int) -> None:
    stack = sim_reset
    stack.processes["worker"].kill()
    paused = stack.start_worker(pause_at=step)
    try:
        ids = submit_light(stack, stack.new_tenant_key(), count)
        wait_until(lambda: f"PAUSED at {step}" in paused.log_text(), 60, 0.05, f"worker paused at {step}")
        paused.kill()
    finally:
        if paused.alive():
            paused.kill()
        stack.start_worker()
    tenant = tenant_id_of(stack, ids[0])
    counts = wait_all_terminal(stack, tenant, count, timeout=120)
    assert counts == {"succeeded": count}
    assert_no_double_billing(stack, tenant)
    ledger = query(stack, "SELECT count(*), count(DISTINCT task_id) FROM ledger_entries WHERE tenant_id = %s",
                   tenant)
    assert ledger == [(count, count)]
    stats = stack.sim("GET", "/_sim/stats")
    assert stats["batch_lines"] == count  # every line submitted exactly once
    batches = query(stack, "SELECT count(DISTINCT batch_id) FROM ledger_entries WHERE tenant_id = %s", tenant)
    assert stats["batches_created"] == batches[0][0]


def test_redis_wipe_while_tasks_are_queued_is_recovered_by_the_reconciler(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.processes["worker"].kill()
    key = stack.new_tenant_key()
    try:
        light = submit_light(stack, key, 40)
        with stack.client(key) as client:
            urgent = client.post("/v1/tasks", json={"tasks": [
                {"prompt": f"Say hi {i}", "tier": "light", "urgent": True} for i in range(10)]}).json()["data"]
        # the dispatch messages sit in Redis, unconsumed; lose them all
        delete_redis_keys(stack.redis_prefix)
        assert query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s AND status = 'queued'",
                     tenant_id_of(stack, light[0]))[0][0] == 50
    finally:
        stack.start_worker()
    tenant = tenant_id_of(stack, light[0])
    counts = wait_all_terminal(stack, tenant, 50, timeout=90)
    assert counts == {"succeeded": 50}
    modes = dict(query(stack, "SELECT mode::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1", tenant))
    assert modes == {"batch": 40, "immediate": 10}
    assert {t["status"] for t in urgent} == {"queued"}
    assert_no_double_billing(stack, tenant)
