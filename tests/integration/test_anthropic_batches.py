"""Non-urgent light work on an Anthropic model goes through Message Batches (the simulator's Anthropic
side) and is billed at batch prices: the price table's own batch price where it has one
(`claude-haiku-4-5`), else the provider's `batch_discount` on the standard price, marked on the row
(`claude-3-5-haiku`, whose batch price in genai-prices 0.2.3 equals its standard price). A worker killed
right after creating the Message Batch leaves one batch at the provider, and every task billed once."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.conftest import SIM_BATCH_DEFAULTS, SIM_DEFAULTS
from tests.support.procs import wait_until
from tests.support.stack import Stack, own_stack, psycopg_dsn

pytestmark = pytest.mark.integration

MILLION = Decimal(1_000_000)
# USD per million tokens, as Anthropic publishes them (input, output); batch: the Batch API's price
STANDARD = {"claude-3-5-haiku": (Decimal("0.80"), Decimal("4.00")),
            "claude-haiku-4-5": (Decimal("1.00"), Decimal("5.00"))}
BATCH = {"claude-3-5-haiku": (Decimal("0.40"), Decimal("2.00")),  # standard × (1 − batch_discount 0.5)
         "claude-haiku-4-5": (Decimal("0.50"), Decimal("2.50"))}  # the price table's own batch price
MARKED = {"claude-3-5-haiku": Decimal("0.5"), "claude-haiku-4-5": None}


def config_for(path: Path, simulator_port: int, light_model: str) -> Path:
    path.write_text(f"""
[providers.sim]
base_url = "http://127.0.0.1:{simulator_port}/v1"
batch = true
prices_from = "openai"

[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{simulator_port}"
batch = true
prices_from = "anthropic"
batch_discount = 0.5

[tiers.light]
provider = "claude"
model = "{light_model}"

[tiers.complex]
provider = "sim"
model = "gpt-4o"

[routing]
classification = "light"

[quality]
shadow_rate = 0.0

[reconciler]
interval_seconds = 1
queued_stale_seconds = 3
batch_stale_seconds = 3

[batch]
max_requests = 4000
max_wait_seconds = 1
poll_interval_seconds = 0.5
assemble_interval_seconds = 0.5
expected_turnaround_seconds = 30
failed_batch_retry_seconds = 0.5
ingest_chunk_lines = 250
max_attempts = 3

[limits]
failed_auth_per_minute = 100000
""")
    return path


@pytest.fixture(scope="module", params=sorted(STANDARD))
def claude_batches(request: pytest.FixtureRequest, base_database_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    model: str = request.param

    def write_config(path: Path, simulator_port: int) -> Path:
        return config_for(path, simulator_port, model)

    with own_stack(base_database_url, Path(tmp_path_factory.mktemp("anthropic-batches")),
                   "tierbatch_message_batches", write_config) as running:
        yield running, model


@pytest.fixture
def stack(claude_batches: tuple[Stack, str]) -> tuple[Stack, str]:
    running, model = claude_batches
    running.sim("POST", "/_sim/config", {"models": SIM_DEFAULTS, "batch": SIM_BATCH_DEFAULTS})
    running.sim("POST", "/_sim/reset")
    return running, model


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def submit_light(stack: Stack, count: int) -> str:
    """`count` non-urgent classification tasks of a new tenant; returns the tenant's id."""
    with stack.client(stack.new_tenant_key("batches")) as client:
        response = client.post("/v1/tasks", json={"tasks": [
            {"prompt": f"Classify ticket {i}. Labels: billing, account, bug", "task_type": "classification"}
            for i in range(count)]})
        assert response.status_code == 202, response.text
        first = response.json()["data"][0]["id"]
    return str(query(stack, "SELECT tenant_id FROM tasks WHERE id = %s", first)[0][0])


def wait_all_succeeded(stack: Stack, tenant: str, count: int, timeout: float = 90) -> None:
    def done() -> bool:
        rows = query(stack, "SELECT count(*) FROM tasks WHERE tenant_id = %s AND status = 'succeeded'", tenant)
        return rows[0][0] == count

    try:
        wait_until(done, timeout, 0.25, "every task succeeded")
    except TimeoutError:
        left = query(stack, "SELECT status::text, count(*) FROM tasks WHERE tenant_id = %s GROUP BY 1", tenant)
        raise AssertionError(f"tasks: {left}\n{stack.processes['worker'].log_text()[-4000:]}") from None


def test_non_urgent_light_tasks_go_through_message_batches_at_batch_prices(stack: tuple[Stack, str]) -> None:
    running, model = stack
    tenant = submit_light(running, 30)
    wait_all_succeeded(running, tenant, 30)
    rows = query(running, "SELECT provider, mode::text, requested_model, input_tokens, cached_tokens, "
                          "cache_write_tokens, output_tokens, input_price, output_price, cost_usd, batch_discount "
                          "FROM ledger_entries WHERE tenant_id = %s", tenant)
    assert len(rows) == 30
    input_price, output_price = BATCH[model]
    for provider, mode, requested, input_tokens, cached, written, output_tokens, unit_in, unit_out, cost, mark in rows:
        assert (provider, mode, requested) == ("claude", "batch", model)
        assert input_tokens > 0 and output_tokens > 0 and cached == written == 0
        assert (unit_in, unit_out) == (input_price, output_price)
        assert cost == (input_tokens * input_price + output_tokens * output_price) / MILLION
        standard_in, standard_out = STANDARD[model]
        assert cost * 2 == (input_tokens * standard_in + output_tokens * standard_out) / MILLION  # half price
        assert mark == MARKED[model]
    stats = running.sim("GET", "/_sim/stats")
    assert stats["message_batch_requests"] == 30 and stats["message_batches_created"] >= 1
    assert stats["messages_calls"] == {} and stats.get("batch_lines", 0) == 0  # no immediate or OpenAI calls


def test_a_worker_killed_after_creating_the_message_batch_creates_no_second_one(stack: tuple[Stack, str]) -> None:
    running, _ = stack
    running.processes["worker"].kill()
    paused = running.start_worker(pause_at="after_create")
    try:
        tenant = submit_light(running, 40)
        wait_until(lambda: "PAUSED at after_create" in paused.log_text(), 60, 0.05, "worker paused after create")
        paused.kill()
    finally:
        if paused.alive():
            paused.kill()
        running.start_worker()
    wait_all_succeeded(running, tenant, 40, timeout=120)
    billed = query(running, "SELECT count(*), count(DISTINCT task_id) FROM ledger_entries "
                            "WHERE tenant_id = %s AND mode <> 'shadow'", tenant)
    assert billed == [(40, 40)]
    stats = running.sim("GET", "/_sim/stats")
    assert stats["message_batches_created"] == 1  # the one created before the kill, found again
    assert stats["message_batch_requests"] == 40
