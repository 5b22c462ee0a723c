"""`/metrics` against the running stack: the series move by what the work did, whichever process did it.

The worker writes its counters to the stack's PROMETHEUS_MULTIPROC_DIR and the API's scrape sums them, so
a job on the batch path, urgent tasks on the worker's immediate path and one gateway call all show in one
scrape. Values are compared as deltas between two scrapes; the counters the worker writes are polled for.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import wait_until
from tests.support.stack import Stack, delete_redis_keys, psycopg_dsn

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
JOB_ITEMS = 5
URGENT_TASKS = 3


def scrape(stack: Stack) -> Samples:
    with stack.admin_client() as admin:
        response = admin.get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def ledger_total(stack: Stack, tenant_id: str) -> Decimal:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT coalesce(sum(cost_usd), 0) FROM ledger_entries WHERE tenant_id = %s",
                           (tenant_id,)).fetchone()
    assert row is not None
    return Decimal(row[0])


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body.get("finished_at") else None

    return wait_until(finished, 120, 0.25, f"job {job_id} finished")  # type: ignore[return-value]


def wait_for_counters(stack: Stack, before: Samples, moved: Mapping[tuple[str, frozenset[tuple[str, str]]], float]
                      ) -> Samples:
    """Scrape until every (name, labels) of `moved` rose by at least its value (the worker writes them after
    its commits, which may land just after the API shows the rows)."""
    def reached() -> Samples | None:
        after = scrape(stack)
        ok = all(delta(before, after, name, **dict(labels)) >= amount for (name, labels), amount in moved.items())
        return after if ok else None

    return wait_until(reached, 60, 0.25, "worker counters in the API's scrape")  # type: ignore[return-value]


def test_metrics_move_by_the_work_of_a_job_urgent_tasks_and_a_gateway_call(sim_reset: Stack) -> None:
    stack = sim_reset
    tenant_id, key = stack.new_tenant("metrics-tenant")
    before = scrape(stack)
    assert total(before, "tierbatch_metrics_database_up") == 1
    run = uuid.uuid4().hex[:8]  # fresh prompts: no answer of an earlier test in the response cache

    with stack.client(key) as client:
        created = client.post("/v1/jobs", json={
            "name": "metrics", "labels": ["billing", "bug"], "tier": "light",
            "items": [{"id": f"i{n}", "text": f"ticket {run} {n}: my invoice is wrong"} for n in range(JOB_ITEMS)]})
        assert created.status_code == 202, created.text
        urgent = client.post("/v1/tasks", json={"tasks": [
            {"prompt": f"Say hi {run} {n}", "tier": "light", "urgent": True} for n in range(URGENT_TASKS)]})
        assert urgent.status_code == 202, urgent.text
        chat = client.post("/v1/chat/completions", json={
            "model": "smart-select", "messages": [{"role": "user", "content": f"Hello {run}"}]})
        assert chat.status_code == 200, chat.text
        for task in urgent.json()["data"]:
            stack.wait_for_task(client, task["id"], {"succeeded"})
        job = wait_for_job(client, created.json()["id"])
    assert job["counts"].get("succeeded") == JOB_ITEMS, job
    job_cost = Decimal(job["cost_usd"])
    assert job_cost > 0

    tenant = {"tenant": tenant_id}
    after = wait_for_counters(stack, before, {
        ("tierbatch_tasks_finished_total", frozenset({"status": "succeeded", "tier": "light",
                                                      "mode": "batch"}.items())): JOB_ITEMS,
        ("tierbatch_tasks_finished_total", frozenset({"status": "succeeded", "mode": "immediate"}.items())):
            URGENT_TASKS + 1,
        ("tierbatch_batch_lines_ingested_total", frozenset({"outcome": "written"}.items())): JOB_ITEMS,
        ("tierbatch_spend_usd_total", frozenset({**tenant, "mode": "batch"}.items())): float(job_cost) * 0.999,
    })

    # the batch path: the job's lines in a provider batch, submitted, done, ingested, billed
    assert delta(before, after, "tierbatch_tasks_finished_total", status="succeeded", tier="light",
                 mode="batch") == JOB_ITEMS
    assert delta(before, after, "tierbatch_batch_lines_ingested_total", outcome="written") == JOB_ITEMS
    assert delta(before, after, "tierbatch_provider_batches_submitted_total", provider="sim",
                 model="gpt-4o-mini") >= 1
    assert delta(before, after, "tierbatch_provider_batches_finished_total", status="done") >= 1
    assert delta(before, after, "tierbatch_provider_batch_turnaround_seconds_count", provider="sim",
                 model="gpt-4o-mini") >= 1
    # spend by tenant: the batch rows are the job's cost, and all of the tenant's rows its ledger, to the cent
    # (and closer: floats of a few decimal amounts)
    batch_spend = delta(before, after, "tierbatch_spend_usd_total", mode="batch", **tenant)
    assert math.isclose(batch_spend, float(job_cost), rel_tol=1e-9), (batch_spend, job_cost)
    all_spend = delta(before, after, "tierbatch_spend_usd_total", **tenant)
    assert math.isclose(all_spend, float(ledger_total(stack, tenant_id)), rel_tol=1e-9)
    assert all_spend > batch_spend  # the immediate calls were billed too
    assert delta(before, after, "tierbatch_baseline_usd_total", **tenant) > all_spend  # batch and light save

    # the immediate path (worker) and the gateway (API): tasks, provider calls, the gateway's own latency
    assert delta(before, after, "tierbatch_tasks_finished_total", status="succeeded",
                 mode="immediate") == URGENT_TASKS + 1
    assert delta(before, after, "tierbatch_provider_call_seconds_count", surface="worker") == URGENT_TASKS
    assert delta(before, after, "tierbatch_provider_call_seconds_count", surface="gateway") == 1
    assert delta(before, after, "tierbatch_provider_call_errors_total") == 0
    assert delta(before, after, "tierbatch_gateway_request_seconds_count", status_class="2xx") == 1
    assert delta(before, after, "tierbatch_gateway_request_seconds_sum") > 0

    # scrape-time gauges: the database answered, nothing of this test is still waiting, no model cools down
    assert total(after, "tierbatch_metrics_database_up") == 1
    assert total(after, "tierbatch_batch_waiting_tasks", provider="sim", model="gpt-4o-mini") == 0
    assert total(after, "tierbatch_model_cooling", provider="sim", model="gpt-4o-mini") == 0
    assert ("tierbatch_provider_batches_live", frozenset({("status", "submitted")})) in after


def test_metrics_waiting_work_shows_in_the_scrape_time_gauges(sim_reset: Stack) -> None:
    """A task held on the batch path (a long wait before assembly is not configurable here, so the test
    reads the gauges while the job's tasks are live) counts as live and waiting until its batch is done."""
    stack = sim_reset
    _, key = stack.new_tenant("metrics-live")
    with stack.client(key) as client:
        created = client.post("/v1/jobs", json={"name": "live", "labels": ["a", "b"], "tier": "light",
                                                "items": [{"id": f"i{n}", "text": f"x {n}"} for n in range(50)]})
        assert created.status_code == 202, created.text

        def seen_live() -> bool:
            samples = scrape(stack)
            return total(samples, "tierbatch_tasks_live", tier="light") > 0

        wait_until(seen_live, 30, 0.05, "live tasks in tierbatch_tasks_live")
        wait_for_job(client, created.json()["id"])

    def drained() -> bool:
        return total(scrape(stack), "tierbatch_tasks_live", tier="light") == 0

    wait_until(drained, 30, 0.25, "no live tasks once the job finished")


def test_metrics_show_spend_per_tenant_to_the_admin_only(stack: Stack) -> None:
    key = stack.new_tenant_key("metrics-outsider")
    with stack.client(key) as client:  # some spend of this tenant's own, so a tenant label exists
        created = client.post("/v1/tasks", json={"prompt": "metrics outsider", "tier": "light", "urgent": True})
        assert created.status_code == 202, created.text
        stack.wait_for_task(client, created.json()["id"], {"succeeded"})

    def tenant_series(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("tierbatch_spend_usd") and "tenant=" in line]

    with stack.admin_client() as admin:
        wait_until(lambda: bool(tenant_series(admin.get("/metrics").text)), 30, 0.25, "spend per tenant scraped")
        served = admin.get("/metrics")
    assert served.status_code == 200
    assert "tierbatch_metrics_database_up 1.0" in served.text
    per_tenant = {family.name: family for family in text_string_to_metric_families(served.text)}
    admin_spend = sum(sample.value for sample in per_tenant["tierbatch_spend_usd"].samples
                      if sample.name == "tierbatch_spend_usd_total")

    anonymous = httpx.get(f"{stack.api_url}/metrics", timeout=10)  # what any scraper sees
    assert anonymous.status_code == 200
    assert "tenant=" not in anonymous.text
    assert not tenant_series(anonymous.text)
    families = {family.name: family for family in text_string_to_metric_families(anonymous.text)}
    summed = [sample for sample in families["tierbatch_spend_usd"].samples
              if sample.name == "tierbatch_spend_usd_total"]
    assert summed and all("tenant" not in sample.labels for sample in summed)
    # the same money, summed over tenants (later work can only add to it)
    # float sums added in another order may differ in the last digit
    assert sum(sample.value for sample in summed) >= admin_spend * (1 - 1e-9) and admin_spend > 0

    with stack.client(key) as client:  # a tenant key is not the admin token: refused, not served less
        refused = client.get("/metrics")
    assert refused.status_code == 401
    assert "tierbatch_spend_usd" not in refused.text


def _chat(stack: Stack, key: str, model: str, content: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": content}], **fields})


def test_cache_hits_and_misses_and_beat_ticks_are_counted(sim_reset: Stack) -> None:
    stack = sim_reset
    _, key = stack.new_tenant("metrics-cache")
    before = scrape(stack)
    question = f"What is the capital of France? {uuid.uuid4().hex}"
    answers = [_chat(stack, key, "smart-select", question, temperature=0) for _ in range(2)]
    assert [a.headers["x-tierbatch-cache"] for a in answers] == ["miss", "hit"]

    def ticked() -> Samples | None:
        after = scrape(stack)
        return after if delta(before, after, "tierbatch_beat_ticks_total", entry="reconcile") >= 2 else None

    after = wait_until(ticked, 30, 0.25, "beat's reconcile ticks in the API's scrape")
    assert isinstance(after, dict)
    assert delta(before, after, "tierbatch_response_cache_lookups_total", result="miss") == 1
    assert delta(before, after, "tierbatch_response_cache_lookups_total", result="hit") == 1
    assert delta(before, after, "tierbatch_tasks_finished_total", status="succeeded", mode="cache") == 1
    assert delta(before, after, "tierbatch_beat_ticks_total", entry="assemble-batches") >= 1


def test_a_failing_model_cools_down_and_the_scrape_says_so(sim_reset: Stack) -> None:
    stack = sim_reset
    _, key = stack.new_tenant("metrics-cooldown")
    cooldown_keys = f"{stack.redis_prefix}tierbatch:cooldown:"
    model = "gpt-4.1-mini"  # asked by name: a chain of this model alone
    stack.sim("POST", "/_sim/config", {"models": {model: {"error_rate": 1.0, "error_status": 500}}})
    client = redis.Redis.from_url(stack.redis_url)
    try:
        before = scrape(stack)
        assert total(before, "tierbatch_model_cooling", provider="sim", model=model) == 0
        # two tries per call; the third failure opens the circuit, and the third call reaches no provider
        statuses = [_chat(stack, key, model, f"hello {n}").status_code for n in range(3)]
        assert all(status >= 500 for status in statuses), statuses
        client.expire(f"{cooldown_keys}open:sim/{model}", 300)  # held open while the test reads it
        after = scrape(stack)
        assert delta(before, after, "tierbatch_cooldown_trips_total", provider="sim", model=model) == 1
        assert delta(before, after, "tierbatch_provider_call_errors_total", provider="sim", model=model,
                     surface="gateway", status_class="5xx") == 3
        assert delta(before, after, "tierbatch_gateway_request_seconds_count") == 3
        assert total(after, "tierbatch_model_cooling", provider="sim", model=model) == 1
        assert total(after, "tierbatch_model_cooling", provider="sim", model="gpt-4o-mini") == 0
        delete_redis_keys(cooldown_keys)
        assert total(scrape(stack), "tierbatch_model_cooling", provider="sim", model=model) == 0
    finally:
        client.close()
        delete_redis_keys(cooldown_keys)
