"""Provider prompt caching end to end: a job with a long system prompt keeps it as the stable
prefix of every request, so after the first call the provider (the simulator) reports cached tokens;
each task's ledger row bills them at the cached-input rate of the model's price; and every request,
batch line or immediate call, carries the task's `prompt_cache_key`.

The arithmetic of cached-token pricing on its own is tested in test_costs_ledger.py; here it is the
flow: tokens the provider reports → task usage → ledger row → cost."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.test_jobs_api import job_tasks, wait_for_job
from tests.support.stack import Stack, psycopg_dsn
from tierbatch.base.config import load_config
from tierbatch.ledger.pricing import MILLION, PriceBook, TokenUsage
from tierbatch.providers.cache_keys import prompt_cache_key

pytestmark = pytest.mark.integration

ITEMS = 6
# about 1,250 tokens (the simulator counts four characters a token): over OpenAI's 1,024-token minimum
RULES = " ".join(f"Rule {i}: a ticket that mentions topic {i} goes to queue {i % 7}." for i in range(90))
_LEDGER = ("SELECT task_id, mode::text, provider, requested_model, served_model, input_tokens, cached_tokens, "
           "output_tokens, input_price, cached_input_price, output_price, input_cost_usd, cached_input_cost_usd, "
           "output_cost_usd, cost_usd FROM ledger_entries WHERE job_id = %s")


def run_job(stack: Stack, client: httpx.Client, task_type: str, urgent: bool) -> tuple[str, list[dict[str, Any]]]:
    system = f"You sort support tickets ({task_type}). {RULES}"
    assert len(system) > 4 * 1100
    answer = client.post("/v1/jobs", json={
        "task_type": task_type, "tier": "light", "urgent": urgent, "system": system,
        "template": "Ticket: {text}", "items": [{"id": f"i{n}", "text": f"ticket {n}: refund please"}
                                                for n in range(ITEMS)]})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    wait_for_job(stack, client, job_id)
    tasks = job_tasks(client, job_id)
    assert {t["status"] for t in tasks} == {"succeeded"}, tasks
    return job_id, tasks


def check_cached_usage(tasks: list[dict[str, Any]]) -> None:
    """The first request of the prefix misses, every later one reads it from the cache."""
    cached = sorted(t["usage"]["cached_tokens"] for t in tasks)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    for task in tasks:
        usage = task["usage"]
        assert usage["cached_tokens"] % 128 == 0 and usage["cached_tokens"] < usage["input_tokens"]
        assert usage["cached_tokens"] == 0 or usage["cached_tokens"] >= 1024


def check_ledger(stack: Stack, job_id: str, tasks: list[dict[str, Any]], mode: str) -> None:
    """Each task's ledger row prices its cached tokens at the model's cached-input rate."""
    prices = PriceBook(load_config(stack.config_path))
    by_task = {t["id"]: t for t in tasks}
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute(_LEDGER, (uuid.UUID(job_id),)).fetchall()
    assert len(rows) == len(tasks)
    for (task_id, row_mode, provider, requested, served, input_tokens, cached_tokens, output_tokens,
         input_price, cached_price, output_price, input_cost, cached_cost, output_cost, cost) in rows:
        task = by_task[str(task_id)]
        assert row_mode == mode and (input_tokens, cached_tokens, output_tokens) == (
            task["usage"]["input_tokens"], task["usage"]["cached_tokens"], task["usage"]["output_tokens"])
        priced = prices.price(provider, served, requested, TokenUsage(input_tokens, cached_tokens, output_tokens),
                              batch=mode == "batch")
        assert priced is not None
        unit = priced.prices
        assert (input_price, cached_price, output_price) == (unit.input, unit.cached_input, unit.output)
        # immediate: gpt-4o-mini's cached rate is half its input rate; batch: genai-prices gives its batch
        # price for cached input as the batch input price (no discount on top of the batch discount)
        assert cached_price < input_price if mode == "immediate" else cached_price <= input_price
        assert input_cost == (input_tokens - cached_tokens) * input_price / MILLION
        assert cached_cost == cached_tokens * cached_price / MILLION
        assert output_cost == output_tokens * output_price / MILLION
        assert cost == input_cost + cached_cost + output_cost == Decimal(task["cost_usd"])
        if cached_tokens and mode == "immediate":  # cheaper than the same tokens uncached
            assert cost < input_tokens * input_price / MILLION + output_cost


def tenant_of(stack: Stack, job_id: str) -> uuid.UUID:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT tenant_id FROM jobs WHERE id = %s", (uuid.UUID(job_id),)).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def test_batch_path_sends_the_key_and_bills_cached_tokens(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key("caching")) as client:
        job_id, tasks = run_job(stack, client, "ticket-sorting", urgent=False)
    assert {t["mode"] for t in tasks} == {"batch"}
    check_cached_usage(tasks)
    check_ledger(stack, job_id, tasks, "batch")
    key = prompt_cache_key("ticket-sorting", tenant_of(stack, job_id))
    stats = stack.sim("GET", "/_sim/stats")
    assert stats["batch_lines"] == ITEMS and stats["prompt_cache_keys"] == {key: ITEMS}


def test_immediate_path_bills_cached_tokens(sim_reset: Stack) -> None:
    stack = sim_reset
    with stack.client(stack.new_tenant_key("caching")) as client:
        job_id, tasks = run_job(stack, client, "ticket-triage", urgent=True)
    assert {t["mode"] for t in tasks} == {"immediate"}
    check_cached_usage(tasks)
    check_ledger(stack, job_id, tasks, "immediate")
    stats = stack.sim("GET", "/_sim/stats")
    assert stats["chat_calls"] == {"gpt-4o-mini": ITEMS}
    key = prompt_cache_key("ticket-triage", tenant_of(stack, job_id))
    assert stats["prompt_cache_keys"] == {key: ITEMS}
