"""A real open model as the light tier: llama-server with SmolLM2-135M (the session's `open_model` fixture)
as provider `open` (`batch = false`, `max_concurrency = 2`), the premium tier and the light fallback on
the simulator. This module runs a stack of its own (its own database, simulator, API, worker and beat).

What is checked against the real server: urgent light tasks answered by it with its own token counts in
the ledger, priced through `[prices]` by its alias; a bulk job through the background lane with the bound
measured on the server (its `/slots`: how many slots are processing), while urgent work is not held
behind it; gateway streaming with its usage chunk; a prompt over a slot's context moving to the next model
of the chain, once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from openai import OpenAI

from tests.integration.conftest import OPEN_MODEL_CONTEXT, OPEN_MODEL_SLOTS
from tests.support.procs import wait_until
from tests.support.stack import Stack, own_stack, psycopg_dsn, write_app_config
from tierbatch.cli.stack.open_model import ALIAS, OPERATOR_PRICES, OpenModelServer

pytestmark = pytest.mark.integration

LANE_BOUND = 2
WORKER_THREADS = 4  # tests/support/stack.py: what an unbounded lane would put in flight
BULK_ITEMS = 200
MILLION = Decimal(1_000_000)
SIM_LIGHT = """[tiers.light]
provider = "sim"
model = "gpt-4o-mini"
"""


def open_model_config(path: Path, simulator_port: int, server: OpenModelServer) -> Path:
    """The test config with the light tier on the open model (its fallback, the simulator's gpt-4.1-mini, kept)."""
    write_app_config(path, simulator_port)
    text = path.read_text()
    assert SIM_LIGHT in text
    path.write_text(text.replace(SIM_LIGHT, f"""[tiers.light]
provider = "open"
model = "{ALIAS}"
""") + f"""
[providers.open]
kind = "openai"
base_url = "{server.spec.base_url}"
batch = false
max_concurrency = {LANE_BOUND}
prompt_cache_key = false
timeout_seconds = 60

[prices."{ALIAS}"]
input = "{OPERATOR_PRICES['input']}"
cached_input = "{OPERATOR_PRICES['cached_input']}"
output = "{OPERATOR_PRICES['output']}"
""")
    return path


@pytest.fixture(scope="module")
def open_stack(open_model: OpenModelServer, base_database_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def write_config(path: Path, simulator_port: int) -> Path:
        return open_model_config(path, simulator_port, open_model)

    with own_stack(base_database_url, Path(tmp_path_factory.mktemp("open-stack")), "tierbatch_open_model",
                   write_config) as running:
        yield running


def query(stack: Stack, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(sql, params).fetchall()


def operator_cost(usage: dict[str, int]) -> Decimal:
    prices = {k: Decimal(v) for k, v in OPERATOR_PRICES.items()}
    uncached = usage["input_tokens"] - usage["cached_tokens"]
    return (prices["input"] * uncached + prices["cached_input"] * usage["cached_tokens"]
            + prices["output"] * usage["output_tokens"]) / MILLION


def test_urgent_light_tasks_are_answered_by_the_open_model_with_its_token_counts(open_stack: Stack) -> None:
    stack = open_stack
    prompts = ["Say hello in French.", "Name a colour of the sky.", "What is 2 + 2? Answer with a number."]
    with stack.client(stack.new_tenant_key("open-urgent")) as client:
        accepted = client.post("/v1/tasks", json={"tasks": [
            {"prompt": p, "tier": "light", "urgent": True, "params": {"max_tokens": 24}} for p in prompts]})
        assert accepted.status_code == 202, accepted.text
        for item in accepted.json()["data"]:
            task = stack.wait_for_task(client, item["id"], {"succeeded", "failed"}, timeout=60)
            assert task["status"] == "succeeded", task
            assert task["mode"] == "immediate" and task["provider"] == "open"
            assert task["model"] == ALIAS and task["served_model"] == ALIAS == task["response"]["model"]
            assert task["output"].strip()
            usage, reported = task["usage"], task["response"]["usage"]
            assert usage["input_tokens"] == reported["prompt_tokens"] > 0
            assert usage["output_tokens"] == reported["completion_tokens"] > 0
            [row] = query(stack, "SELECT mode::text, provider, requested_model, served_model, input_tokens, "
                                 "cached_tokens, output_tokens, cost_usd, unpriced FROM ledger_entries "
                                 "WHERE task_id = %s", item["id"])
            assert row[:7] == ("immediate", "open", ALIAS, ALIAS, usage["input_tokens"], usage["cached_tokens"],
                               usage["output_tokens"])
            assert row[8] is False and row[7] == operator_cost(usage).quantize(row[7])


class SlotWatch:
    """Polls llama-server's `/slots` and keeps the most slots seen processing at once."""

    def __init__(self, server: OpenModelServer) -> None:
        self._url = f"{server.spec.root_url}/slots"
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.01):
                slots = client.get(self._url).json()
                busy = sum(1 for slot in slots if slot.get("is_processing"))
                self.most = max(self.most, busy)
                self.samples += 1

    def __enter__(self) -> SlotWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_bulk_job_goes_through_the_bounded_background_lane(open_stack: Stack, open_model: OpenModelServer
                                                             ) -> None:
    stack = open_stack
    assert OPEN_MODEL_SLOTS >= WORKER_THREADS > LANE_BOUND  # an unbounded lane would show on the server
    items = [{"id": f"r-{i}", "text": f"Review {i}: {'great value' if i % 2 else 'broke after a day'}."}
             for i in range(BULK_ITEMS)]
    with stack.client(stack.new_tenant_key("open-bulk")) as client, SlotWatch(open_model) as watch:
        job = client.post("/v1/jobs", json={
            "name": "open-lane", "task_type": "classification", "tier": "light", "urgent": False,
            "system": "Classify the sentiment of the review.", "template": "{text}",
            "labels": ["positive", "negative"], "items": items})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        # urgent work is not held behind the lane's backlog
        def lane_running() -> bool:
            counts = client.get(f"/v1/jobs/{job_id}").json()["counts"]
            return bool(counts.get("running")) and bool(counts.get("queued"))

        wait_until(lane_running, 60, 0.05, "the lane under way with a backlog")
        started = time.monotonic()
        urgent = client.post("/v1/tasks", json={"prompt": "Say hi.", "tier": "light", "urgent": True,
                                                "params": {"max_tokens": 8}}).json()
        done = stack.wait_for_task(client, urgent["id"], {"succeeded", "failed"}, timeout=30)
        assert done["status"] == "succeeded" and done["served_model"] == ALIAS
        urgent_seconds = time.monotonic() - started
        assert client.get(f"/v1/jobs/{job_id}").json()["counts"].get("queued"), "the backlog was still there"

        def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            return body if body["status"] == "completed" else None

        body = wait_until(finished, 600, 0.5, "the bulk job")
    assert isinstance(body, dict)
    # the lane's calls plus the one urgent call: the bound is the lane's, urgent work has its own slot
    assert watch.samples > 100 and LANE_BOUND <= watch.most <= LANE_BOUND + 1, (watch.most, watch.samples)
    rows = query(stack, "SELECT status::text, mode::text, served_model, count(*) FROM tasks WHERE job_id = %s "
                        "GROUP BY 1, 2, 3", job_id)
    assert sum(r[3] for r in rows) == BULK_ITEMS
    # every answer came from the open model (a grammar keeps SmolLM2 to the labels); none went to a batch
    assert rows == [("succeeded", "immediate", ALIAS, BULK_ITEMS)], rows
    [(billed, priced)] = query(stack, "SELECT count(*), count(cost_usd) FROM ledger_entries WHERE job_id = %s",
                               job_id)
    assert billed == priced == BULK_ITEMS
    assert urgent_seconds < 20


def test_gateway_streaming_relays_the_open_models_usage(open_stack: Stack) -> None:
    stack = open_stack
    client = OpenAI(base_url=stack.api_url + "/v1", api_key=stack.new_tenant_key("open-stream"), max_retries=0,
                    timeout=60)
    try:
        with client.chat.completions.with_streaming_response.create(
                model="smart-select", messages=[{"role": "user", "content": "Tell me a very short story."}],
                stream=True, stream_options={"include_usage": True}, max_tokens=40,
                metadata={"tier": "light"}) as response:
            task_id = response.headers["x-tierbatch-task-id"]
            chunks = [httpx.Response(200, content=line[5:]).json() for line in response.iter_lines()
                      if line.startswith("data:") and line != "data: [DONE]"]
    finally:
        client.close()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert text.strip() and len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    usage = usage_chunks[0]["usage"]

    def recorded() -> list[tuple[Any, ...]]:
        return query(stack, "SELECT t.status::text, t.output, t.served_model, l.input_tokens, l.output_tokens, "
                            "l.usage_estimated FROM tasks t JOIN ledger_entries l ON l.task_id = t.id "
                            "WHERE t.id = %s", task_id)

    rows = wait_until(recorded, 10, message="the stream's ledger row")
    assert isinstance(rows, list)
    assert rows[0] == ("succeeded", text, ALIAS, usage["prompt_tokens"], usage["completion_tokens"], False)


def context_refusals(server: OpenModelServer) -> int:
    """How many requests llama-server refused for their length so far (the errors in its log)."""
    return len(re.findall(r"send_error: .*exceeds the available context size", server.log_path.read_text(
        errors="replace")))


def test_a_prompt_over_the_context_moves_to_the_next_model_once(open_stack: Stack, open_model: OpenModelServer
                                                                ) -> None:
    stack = open_stack
    slot_tokens = OPEN_MODEL_CONTEXT // OPEN_MODEL_SLOTS
    long_prompt = "Summarise this in one line: " + " ".join(f"word{i}" for i in range(slot_tokens * 2))
    before = context_refusals(open_model)
    with stack.client(stack.new_tenant_key("open-long")) as client:
        accepted = client.post("/v1/tasks", json={"prompt": long_prompt, "tier": "light", "urgent": True,
                                                  "params": {"max_tokens": 16}})
        assert accepted.status_code == 202, accepted.text
        task = stack.wait_for_task(client, accepted.json()["id"], {"succeeded", "failed"}, timeout=60)
    assert task["status"] == "succeeded", task
    # the test config's light fallback (tests/support/stack.py)
    assert task["provider"] == "sim" and task["model"] == "gpt-4.1-mini" and task["attempts"] == 1
    assert task["served_model"].startswith("gpt-4.1-mini")
    # refused once by the open model, then the fallback: the same model is not asked again
    wait_until(lambda: context_refusals(open_model) > before, 5, 0.1, "the refusal in llama-server's log")
    assert context_refusals(open_model) - before == 1
