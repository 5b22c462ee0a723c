"""The batch path end to end: waiting tasks → provider batches at the simulator → results and
batch-priced ledger rows, through failures of lines and of whole batches."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from genai_prices import Usage, calc_price

from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration


def submit_light(stack: Stack, key: str, count: int, **extra: Any) -> list[str]:
    ids: list[str] = []
    with stack.client(key) as client:
        for start in range(0, count, 1000):
            tasks = [{"prompt": f"Classify ticket {i}. Labels: billing, account, bug",
                      "task_type": "classification", **extra} for i in range(start, min(count, start + 1000))]
            response = client.post("/v1/tasks", json={"tasks": tasks})
            assert response.status_code == 202, response.text
            ids += [t["id"] for t in response.json()["data"]]
    return ids


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def tenant_id_of(stack: Stack, task_id: str) -> str:
    return str(query(stack, "SELECT tenant_id FROM tasks WHERE id = %s", task_id)[0][0])


def wait_all_terminal(stack: Stack, tenant_id: str, expected: int, timeout: float = 120) -> dict[str, int]:
    def done() -> dict[str, int] | None:
        rows = query(stack, "SELECT status::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1", tenant_id)
        counts = {status: int(n) for status, n in rows}
        terminal = sum(n for s, n in counts.items() if s in ("succeeded", "failed", "cancelled"))
        return counts if terminal == expected else None

    try:
        return wait_until(done, timeout, 0.25, "all tasks terminal")  # type: ignore[return-value]
    except TimeoutError:
        rows = query(stack, "SELECT status::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1", tenant_id)
        raise AssertionError(f"not all terminal: {rows}\n{stack.processes['worker'].log_text()}") from None


def assert_no_double_billing(stack: Stack, tenant_id: str) -> None:
    duplicated = query(stack, "SELECT task_id FROM ledger_entries WHERE tenant_id = %s AND mode <> 'shadow' "
                              "GROUP BY task_id HAVING count(*) > 1", tenant_id)
    assert duplicated == []
    mismatched = query(stack, "SELECT t.id FROM tasks t LEFT JOIN ledger_entries l ON l.task_id = t.id "
                              "WHERE t.tenant_id = %s GROUP BY t.id, t.cost_usd "
                              "HAVING t.cost_usd IS DISTINCT FROM sum(l.cost_usd)", tenant_id)
    assert mismatched == []
    # the ledger has no foreign key to its task: every row must still name one of the tenant's tasks
    orphans = query(stack, "SELECT l.id FROM ledger_entries l LEFT JOIN tasks t ON t.id = l.task_id "
                           "AND t.tenant_id = l.tenant_id WHERE l.tenant_id = %s AND t.id IS NULL", tenant_id)
    assert orphans == []


def test_ten_thousand_light_tasks_go_through_split_provider_batches(sim_reset: Stack) -> None:
    stack = sim_reset
    ids = submit_light(stack, stack.new_tenant_key(), 10_000)
    tenant = tenant_id_of(stack, ids[0])
    counts = wait_all_terminal(stack, tenant, 10_000, timeout=180)
    assert counts == {"succeeded": 10_000}

    per_batch = query(stack, "SELECT batch_id, count(*) FROM ledger_entries WHERE tenant_id = %s "
                             "GROUP BY batch_id", tenant)
    assert all(batch is not None for batch, _ in per_batch)
    assert max(n for _, n in per_batch) <= 4000  # max_requests in the test config
    assert sum(n for _, n in per_batch) == 10_000
    assert len(per_batch) >= 3
    modes = query(stack, "SELECT mode::text, count(*), count(DISTINCT task_id) FROM ledger_entries "
                         "WHERE tenant_id = %s GROUP BY 1", tenant)
    assert modes == [("batch", 10_000, 10_000)]

    # batch price: genai-prices' batch context for the served model
    sample = query(stack, "SELECT served_model, input_tokens, cached_tokens, output_tokens, cost_usd "
                          "FROM ledger_entries WHERE tenant_id = %s LIMIT 20", tenant)
    for served, input_tokens, cached, output, cost in sample:
        expected = calc_price(Usage(input_tokens=input_tokens, cache_read_tokens=cached, output_tokens=output),
                              model_ref=served, provider_id="openai",
                              price_context={"processing": "batch"}).total_price
        assert cost.quantize(Decimal("1e-8")) == expected.quantize(Decimal("1e-8"))
    assert_no_double_billing(stack, tenant)

    stats = stack.sim("GET", "/_sim/stats")
    assert stats["batch_lines"] == 10_000  # no claim submitted twice
    assert stats["batches_created"] == len(per_batch)
    assert stats["chat_calls"] == {}


def test_partial_line_failures_are_retried_within_max_attempts(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"batch": {"line_error_rate": 0.4}})
    ids = submit_light(stack, stack.new_tenant_key(), 300)
    tenant = tenant_id_of(stack, ids[0])
    counts = wait_all_terminal(stack, tenant, 300)
    assert set(counts) <= {"succeeded", "failed"}
    assert counts.get("succeeded", 0) > 150
    rows = query(stack, "SELECT status::text, attempts, error FROM tasks WHERE tenant_id = %s", tenant)
    assert max(attempts for _, attempts, _ in rows) <= 3
    for status, _attempts, error in rows:
        if status == "failed":
            assert error  # with the provider's reason
    assert any(a > 1 for s, a, _ in rows if s == "succeeded")  # some succeeded on a later batch
    succeeded = counts.get("succeeded", 0)
    assert query(stack, "SELECT count(*) FROM ledger_entries WHERE tenant_id = %s", tenant)[0][0] == succeeded \
        or all(s != "failed" or "not one of the labels" not in (e or "") for s, _, e in rows)
    assert_no_double_billing(stack, tenant)


def test_expired_batches_end_every_task_with_a_reason(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"batch": {"expire": True}})
    ids = submit_light(stack, stack.new_tenant_key(), 200)
    tenant = tenant_id_of(stack, ids[0])
    counts = wait_all_terminal(stack, tenant, 200)
    assert set(counts) <= {"succeeded", "failed"}
    failed = query(stack, "SELECT attempts, error FROM tasks WHERE tenant_id = %s AND status = 'failed'", tenant)
    for attempts, error in failed:
        assert attempts == 3
        assert "batch_expired" in error
    assert_no_double_billing(stack, tenant)


def test_cancelled_batch_keeps_partial_output_and_retries_the_rest(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"batch": {"in_progress_seconds": 30}})
    ids = submit_light(stack, stack.new_tenant_key(), 100)
    tenant = tenant_id_of(stack, ids[0])

    def submitted_batch() -> str | None:
        rows = query(stack, "SELECT DISTINCT b.provider_batch_id FROM provider_batches b JOIN tasks t "
                            "ON t.batch_id = b.id WHERE t.tenant_id = %s AND b.status = 'submitted'", tenant)
        return rows[0][0] if rows else None

    provider_batch_id = wait_until(submitted_batch, 30, 0.1, "a submitted batch")
    stack.sim("POST", "/_sim/config", {"batch": {"in_progress_seconds": 0.3}})
    stack.sim("POST", f"/v1/batches/{provider_batch_id}/cancel")
    counts = wait_all_terminal(stack, tenant, 100)
    assert counts == {"succeeded": 100}
    statuses = query(stack, "SELECT provider_status::text FROM provider_batches WHERE provider_batch_id = %s",
                     provider_batch_id)
    assert statuses == [("cancelled",)]
    assert_no_double_billing(stack, tenant)


@pytest.mark.parametrize("failure", ["validation", "token_limit"])
def test_batch_refused_as_a_whole_is_split_and_retried(sim_reset: Stack, failure: str) -> None:
    stack = sim_reset
    if failure == "validation":
        stack.sim("POST", "/_sim/config", {"batch": {"max_lines": 50}})
    else:
        stack.sim("POST", "/_sim/config", {"batch": {"enqueued_token_limit": 1500}})
    ids = submit_light(stack, stack.new_tenant_key(), 120)
    tenant = tenant_id_of(stack, ids[0])
    counts = wait_all_terminal(stack, tenant, 120)
    assert counts == {"succeeded": 120}
    refused = query(stack, "SELECT count(*) FROM provider_batches WHERE status = 'failed' AND error IS NOT NULL "
                           "AND provider_batch_id IS NOT NULL AND id IN (SELECT batch_id FROM ledger_entries "
                           "WHERE tenant_id = %s) ", tenant)
    assert refused[0][0] == 0  # results only come from batches that completed
    attempts = query(stack, "SELECT max(attempts) FROM tasks WHERE tenant_id = %s", tenant)[0][0]
    assert attempts <= 3
    assert_no_double_billing(stack, tenant)


def test_near_deadline_light_task_is_served_immediately(sim_reset: Stack) -> None:
    from datetime import UTC, datetime, timedelta

    stack = sim_reset
    with stack.client(stack.new_tenant_key()) as client:
        soon = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
        later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
        near = client.post("/v1/tasks", json={"prompt": "label it", "task_type": "classification",
                                              "deadline": soon}).json()
        far = client.post("/v1/tasks", json={"prompt": "label it", "task_type": "classification",
                                             "deadline": later}).json()
        assert stack.wait_for_task(client, near["id"], {"succeeded"})["mode"] == "immediate"
        assert stack.wait_for_task(client, far["id"], {"succeeded"}, timeout=60)["mode"] == "batch"
