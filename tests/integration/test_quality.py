"""Quality-aware routing end to end: shadow comparisons against the simulator's agreement model,
promotion after min_samples, demotion by probes, pinned rules, provider errors.

The session stack runs with the default quality settings (5% sampling, 50 samples), too slow for a test:
this module starts its own API, worker and beat on the same database and simulator, with a config that
shadows every Light task and decides after 10 comparisons.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.procs import wait_until
from tests.support.quality import quality_row
from tests.support.stack import Stack, psycopg_dsn, sibling_stack
from tierbatch.tasks.labels import label_response_format

pytestmark = pytest.mark.integration

QUALITY = """
[quality]
shadow_rate = 1.0
min_samples = 10
window = 20
probe_rate = 1.0
promote_below = 0.9
demote_above = 0.95
"""
LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def qstack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with sibling_stack(stack, Path(tmp_path_factory.mktemp("quality")), QUALITY) as own:
        yield own


@pytest.fixture
def quality_stack(qstack: Stack, sim_reset: Stack) -> Stack:
    """The quality stack, with the simulator reset (sim_reset) before and after the test."""
    return qstack


def agreement(stack: Stack, light: float, complex_errors: float = 0.0) -> None:
    stack.sim("POST", "/_sim/config", {"models": {
        "gpt-4o": {"reference": True, "error_rate": complex_errors, "retry_after_seconds": 0.05},
        "gpt-4o-mini": {"agreement": light}}})


def submit_wave(client: httpx.Client, task_type: str, start: int, count: int) -> list[dict[str, Any]]:
    tasks = [{"prompt": f"Review {task_type} #{i}: the parcel came on time and looked fine.",
              "task_type": task_type, "urgent": True, "params": {"response_format": label_response_format(LABELS)}}
             for i in range(start, start + count)]
    response = client.post("/v1/tasks", json={"tasks": tasks})
    assert response.status_code == 202, response.text
    return list(response.json()["data"])


def comparisons(stack: Stack, task_ids: list[str]) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute("SELECT agreed, shadow_tier::text FROM quality_comparisons WHERE task_id = ANY(%s)",
                            ([uuid.UUID(t) for t in task_ids],)).fetchall()


def run_wave(stack: Stack, client: httpx.Client, task_type: str, start: int, count: int = 10
             ) -> list[dict[str, Any]]:
    """Submit a wave and wait until every one of its tasks has its comparison (no fixed sleeps)."""
    accepted = submit_wave(client, task_type, start, count)
    ids = [a["id"] for a in accepted]
    try:
        wait_until(lambda: len(comparisons(stack, ids)) == count, 60, 0.1, f"{count} comparisons")
    except TimeoutError:
        raise AssertionError(f"comparisons: {comparisons(stack, ids)}\n"
                             f"worker log:\n{stack.processes['worker'].log_text()[-5000:]}") from None
    return accepted


def test_high_agreement_stays_light(quality_stack: Stack) -> None:
    stack = quality_stack
    agreement(stack, 0.97)
    task_type = "steady"  # fixed: the simulator's answers are a stable hash of the prompt
    with stack.client(stack.new_tenant_key()) as client:
        for wave in range(3):
            accepted = run_wave(stack, client, task_type, wave * 10)
            assert {a["tier"] for a in accepted} == {"light"}, json.dumps(quality_row(client, task_type))
        row = quality_row(client, task_type)
        assert row["tier"] == "auto" and row["events"] == []
        assert row["samples"] == 20 and row["agreement"] >= 0.9
        assert row["shadow_cost_usd"] is not None and float(row["shadow_cost_usd"]) > 0
    calls = stack.sim("GET", "/_sim/stats")["chat_calls"]
    assert calls["gpt-4o"] == 30  # every Light task shadowed once on the complex model
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute(
            "SELECT t.cost_usd = sum(l.cost_usd), count(*) FILTER (WHERE l.mode = 'shadow'), "
            "count(*) FILTER (WHERE l.mode <> 'shadow') FROM tasks t JOIN ledger_entries l ON l.task_id = t.id "
            "WHERE t.task_type = 'steady' GROUP BY t.id, t.cost_usd").fetchall()
    # no double billing: one billed row per task; its cost is the sum of its ledger rows, shadow included
    assert len(rows) == 30 and set(rows) == {(True, 1, 1)}


def test_low_agreement_promotes_and_recovered_agreement_demotes_by_probes(quality_stack: Stack) -> None:
    stack = quality_stack
    agreement(stack, 0.7)
    task_type = "shaky"  # fixed: the simulator's answers are a stable hash of the prompt
    with stack.client(stack.new_tenant_key()) as client:
        start = 0
        first = run_wave(stack, client, task_type, start)
        assert {a["tier"] for a in first} == {"light"}
        routes = {r["task_type"]: r for r in client.get("/v1/routes").json()["data"]}
        while routes.get(task_type, {}).get("tier") != "complex":
            start += 10
            assert start < 60, quality_row(client, task_type)
            run_wave(stack, client, task_type, start)
            routes = {r["task_type"]: r for r in client.get("/v1/routes").json()["data"]}
        assert routes[task_type]["source"] == "quality"
        [promotion] = quality_row(client, task_type)["events"]
        assert promotion["action"] == "promote" and promotion["to_tier"] == "complex"
        assert promotion["figures"]["samples"] >= 10 and promotion["figures"]["agreement"] < 0.9

        # promoted: new tasks are complex; probes run them on the light model as well
        agreement(stack, 1.0)
        start += 10
        probed = run_wave(stack, client, task_type, start)
        assert {a["tier"] for a in probed} == {"complex"}
        assert {c[1] for c in comparisons(stack, [a["id"] for a in probed])} == {"light"}
        wait_until(lambda: any(r["task_type"] == task_type and r["tier"] == "light"
                               for r in client.get("/v1/routes").json()["data"]), 10, 0.1, "demotion")
        events = quality_row(client, task_type)["events"]
        assert [e["action"] for e in events] == ["promote", "demote"]
        assert events[1]["figures"]["agreement"] > 0.95 and events[1]["figures"]["samples"] >= 10
        after = submit_wave(client, task_type, start + 10, 1)
        assert after[0]["tier"] == "light"


def test_pinned_rule_never_moves(quality_stack: Stack) -> None:
    stack = quality_stack
    agreement(stack, 0.5)
    task_type = "pinned"  # fixed: the simulator's answers are a stable hash of the prompt
    with stack.client(stack.new_tenant_key()) as client:
        put = client.put(f"/v1/routes/{task_type}",
                         json={"tier": "light", "pinned": True, "reason": "cheap on purpose"})
        assert put.status_code == 200, put.text
        assert put.json() == {**put.json(), "tier": "light", "pinned": True, "source": "api"}
        for wave in range(3):
            accepted = run_wave(stack, client, task_type, wave * 10)
            assert {a["tier"] for a in accepted} == {"light"}
        row = quality_row(client, task_type)
        assert row["pinned"] is True and row["tier"] == "light"
        assert row["samples"] == 20 and row["agreement"] < 0.9  # would have been promoted
        assert [e["action"] for e in row["events"]] == ["set"]
        assert row["events"][0]["reason"] == "cheap on purpose"
        routes = {r["task_type"]: r for r in client.get("/v1/routes").json()["data"]}
        assert routes[task_type]["pinned"] is True
        # seeded lazily from config [routing]
        assert (routes["classification"]["tier"], routes["classification"]["source"]) == ("light", "config")
        assert routes["reasoning"]["tier"] == "complex"
        assert client.put("/v1/routes/x", json={"tier": "auto"}).status_code in (400, 422)


def test_provider_errors_on_the_shadow_call_promote_nothing(quality_stack: Stack) -> None:
    stack = quality_stack
    agreement(stack, 0.5, complex_errors=1.0)
    task_type = "errors"  # fixed: the simulator's answers are a stable hash of the prompt
    with stack.client(stack.new_tenant_key()) as client:
        accepted = run_wave(stack, client, task_type, 0, 15)
        assert {c[0] for c in comparisons(stack, [a["id"] for a in accepted])} == {None}
        row = quality_row(client, task_type)
        assert row["samples"] == 0 and row["provider_errors"] == 15
        assert row["events"] == [] and row["tier"] == "auto"
        assert all(r["task_type"] != task_type for r in client.get("/v1/routes").json()["data"])


def chat_call(client: httpx.Client, task_type: str, index: int) -> httpx.Response:
    response = client.post("/v1/chat/completions", json={
        "model": "smart-select", "metadata": {"task_type": task_type},
        "messages": [{"role": "user", "content": f"Review {task_type} #{index}: the parcel came late and dented."}],
        "response_format": label_response_format(LABELS)})
    assert response.status_code == 200, response.text
    return response


def test_gateway_calls_are_shadowed_and_alone_promote_their_type(quality_stack: Stack) -> None:
    """Calls through the OpenAI-compatible front door are sampled like tasks: each light answer here gets
    its comparison (billed on the call's own task), and a type served only there is promoted when the light
    model disagrees, after which smart-select serves it on the premium model."""
    stack = quality_stack
    agreement(stack, 0.3)
    task_type = "gateway-reviews"  # fixed: the simulator's answers are a stable hash of the prompt
    with stack.client(stack.new_tenant_key()) as client:
        answered = [chat_call(client, task_type, i) for i in range(12)]
        assert {r.headers["x-tierbatch-tier"] for r in answered} == {"light"}
        ids = [r.headers["x-tierbatch-task-id"] for r in answered]
        try:
            wait_until(lambda: len(comparisons(stack, ids)) == len(ids), 60, 0.1, "a comparison per call")
        except TimeoutError:
            raise AssertionError(f"comparisons: {comparisons(stack, ids)}\n"
                                 f"worker log:\n{stack.processes['worker'].log_text()[-5000:]}") from None
        compared = comparisons(stack, ids)
        assert {tier for _, tier in compared} == {"complex"}
        verdicts = [agreed for agreed, _ in compared]
        assert None not in verdicts and sum(verdicts) / len(verdicts) < 0.9  # counted, and mostly disagreeing
        row = quality_row(client, task_type)  # its window starts again at the promotion
        assert [e["to_tier"] for e in row["events"]] == ["complex"], row["events"]
        # the API remembers a tenant's rules for a few seconds: the next calls see the promotion soon
        promoted = wait_until(lambda: chat_call(client, task_type, 100).headers["x-tierbatch-tier"] == "complex",
                              30, 0.5, "a call served on the premium model")
        assert promoted
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute(
            "SELECT t.cost_usd = sum(l.cost_usd), count(*) FILTER (WHERE l.mode = 'shadow'), "
            "count(*) FILTER (WHERE l.mode <> 'shadow') FROM tasks t JOIN ledger_entries l ON l.task_id = t.id "
            "WHERE t.id = ANY(%s) GROUP BY t.id, t.cost_usd", ([uuid.UUID(i) for i in ids],)).fetchall()
    assert len(rows) == 12 and set(rows) == {(True, 1, 1)}  # one shadow row and one billed row per call
