"""The response cache end to end: through the OpenAI SDK against the gateway and through
`POST /v1/tasks` against the worker, with the simulator's call counts as the proof of what reached a
provider. The session stack runs with the default cache settings (on, 24 h TTL, deterministic requests)
plus two task type policies (`cached_always`, `never_cached`; tests/support/stack.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from openai import OpenAI

from tests.support.procs import wait_until
from tests.support.stack import Stack, psycopg_dsn

pytestmark = pytest.mark.integration

Sdk = Callable[[str], OpenAI]  # the `openai_sdk` fixture (conftest)

def provider_calls(stack: Stack) -> int:
    return sum(stack.sim("GET", "/_sim/stats")["chat_calls"].values())


def ledger_rows(stack: Stack, task_ids: list[str]) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        return conn.execute(
            "SELECT task_id::text, mode::text, cost_usd, baseline_cost_usd, input_tokens, output_tokens "
            "FROM ledger_entries WHERE task_id = ANY(%s)", ([uuid.UUID(t) for t in task_ids],)).fetchall()


def ask(client: OpenAI, text: str, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="smart-select", messages=[{"role": "user", "content": text}], **extra)


def test_gateway_repeat_is_served_from_cache_at_zero_cost(sim_reset: Stack, openai_sdk: Sdk) -> None:
    stack = sim_reset
    client = openai_sdk(stack.new_tenant_key())
    first = ask(client, "Name the capital of France.", temperature=0)
    second = ask(client, "Name the capital of France.", temperature=0)
    assert provider_calls(stack) == 1
    assert (first.headers["x-tierbatch-cache"], second.headers["x-tierbatch-cache"]) == ("miss", "hit")
    assert Decimal(first.headers["x-tierbatch-cost-usd"]) > 0
    assert Decimal(second.headers["x-tierbatch-cost-usd"]) == 0
    one, two = first.parse(), second.parse()
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.model == one.model  # the model that served the answer, not smart-select
    ids = [first.headers["x-tierbatch-task-id"], second.headers["x-tierbatch-task-id"]]
    rows = {r[0]: r for r in ledger_rows(stack, ids)}
    miss, hit = rows[ids[0]], rows[ids[1]]
    assert miss[1] == "immediate" and hit[1] == "cache"
    assert hit[2] == 0 and hit[3] == miss[3] and hit[3] > 0  # cost 0, baseline kept
    assert hit[4:] == miss[4:]  # the tokens the answer took
    with stack.client(client.api_key) as native:
        task = native.get(f"/v1/tasks/{ids[1]}").json()
    assert (task["status"], task["mode"], Decimal(str(task["cost_usd"]))) == ("succeeded", "cache", 0)


def test_gateway_cache_is_per_tenant_and_honours_the_opt_out(sim_reset: Stack, openai_sdk: Sdk) -> None:
    stack = sim_reset
    alice, bob = openai_sdk(stack.new_tenant_key("alice")), openai_sdk(stack.new_tenant_key("bob"))
    question = "Which planet is the largest?"
    assert ask(alice, question, temperature=0).headers["x-tierbatch-cache"] == "miss"
    assert ask(bob, question, temperature=0).headers["x-tierbatch-cache"] == "miss"  # not alice's answer
    assert ask(bob, question, temperature=0).headers["x-tierbatch-cache"] == "hit"
    assert provider_calls(stack) == 2
    # metadata.cache = "off": always a provider call, and the cached entry is left as it was
    off = ask(alice, question, temperature=0, metadata={"cache": "off"})
    assert off.headers["x-tierbatch-cache"] == "miss"
    assert provider_calls(stack) == 3
    # not deterministic (temperature above 0): never cached by default
    for _ in range(2):
        assert ask(alice, question, temperature=0.8).headers["x-tierbatch-cache"] == "miss"
    assert provider_calls(stack) == 5
    # a seed without a temperature is deterministic; another parameter is another request
    assert ask(alice, question, seed=3).headers["x-tierbatch-cache"] == "miss"
    assert ask(alice, question, seed=3).headers["x-tierbatch-cache"] == "hit"
    assert ask(alice, question, seed=3, max_tokens=5).headers["x-tierbatch-cache"] == "miss"
    assert provider_calls(stack) == 7
    # per task type policy from config: `cached_always` caches any request, `never_cached` none
    for task_type, expected in (("cached_always", ["miss", "hit"]), ("never_cached", ["miss", "miss"])):
        seen = [ask(alice, question, temperature=0.8, metadata={"task_type": task_type}
                    ).headers["x-tierbatch-cache"] for _ in range(2)]
        assert seen == expected, task_type


def test_twenty_identical_concurrent_calls_make_one_provider_call(sim_reset: Stack, openai_sdk: Sdk) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"models": {"*": {"latency_ms": [400, 400]}}})
    client = openai_sdk(stack.new_tenant_key())
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: ask(client, "Summarize: the meeting moved to Tuesday.", temperature=0),
                                range(20)))
    assert provider_calls(stack) == 1
    assert sorted(a.headers["x-tierbatch-cache"] for a in answers) == ["hit"] * 19 + ["miss"]
    assert len({a.parse().choices[0].message.content for a in answers}) == 1
    rows = ledger_rows(stack, [a.headers["x-tierbatch-task-id"] for a in answers])
    assert sorted(r[1] for r in rows) == ["cache"] * 19 + ["immediate"]


def submit(client: Any, tasks: list[dict[str, Any]]) -> list[str]:
    response = client.post("/v1/tasks", json={"tasks": tasks})
    assert response.status_code == 202, response.text
    return [t["id"] for t in response.json()["data"]]


def test_answers_from_a_provider_batch_serve_their_repeats_and_only_theirs(sim_reset: Stack) -> None:
    """Ingestion stores the deterministic answers of a batch (the candidates are read with the chunk's
    requests): their repeats are answered from the cache at no cost; a non-deterministic request's is not."""
    stack = sim_reset
    tag = uuid.uuid4().hex[:8]
    light = {"task_type": "classification", "urgent": False}
    kept = {**light, "prompt": f"Classify ticket {tag}: refund. Labels: billing, bug", "params": {"temperature": 0}}
    warm = {**light, "prompt": f"Classify ticket {tag}: crash. Labels: billing, bug", "params": {"temperature": 0.9}}
    with stack.client(stack.new_tenant_key()) as client:
        first = [stack.wait_for_task(client, t, {"succeeded", "failed"}) for t in submit(client, [kept, warm])]
        assert [(d["status"], d["mode"]) for d in first] == [("succeeded", "batch")] * 2
        again = [stack.wait_for_task(client, t, {"succeeded", "failed"}) for t in submit(client, [kept, warm])]
    assert (again[0]["status"], again[0]["mode"], again[0]["output"]) == ("succeeded", "cache", first[0]["output"])
    assert Decimal(str(again[0]["cost_usd"])) == 0
    assert (again[1]["status"], again[1]["mode"]) == ("succeeded", "batch")  # not stored: another batch


def test_tasks_share_one_provider_call_and_repeats_cost_nothing(sim_reset: Stack) -> None:
    stack = sim_reset
    stack.sim("POST", "/_sim/config", {"models": {"*": {"latency_ms": [300, 300]}}})
    task = {"prompt": "Translate to French: good morning", "urgent": True, "params": {"temperature": 0}}
    with stack.client(stack.new_tenant_key()) as client:
        ids = submit(client, [task] * 20)  # identical, in flight at the same moment
        done = [stack.wait_for_task(client, t, {"succeeded", "failed"}) for t in ids]
        assert {d["status"] for d in done} == {"succeeded"}
        assert provider_calls(stack) == 1
        assert sorted(d["mode"] for d in done) == ["cache"] * 19 + ["immediate"]
        assert len({d["output"] for d in done}) == 1
        # later, non-urgent: answered from the cache when routed, without a provider batch
        [later] = submit(client, [{**task, "urgent": False}])
        answer = stack.wait_for_task(client, later, {"succeeded", "failed"})
        assert (answer["status"], answer["mode"], Decimal(str(answer["cost_usd"]))) == ("succeeded", "cache", 0)
        assert Decimal(str(answer["baseline_cost_usd"])) > 0
        assert stack.sim("GET", "/_sim/stats")["batches_created"] == 0
        # the opt-out: a provider call again
        [off] = submit(client, [{**task, "metadata": {"cache": "off"}}])
        assert stack.wait_for_task(client, off, {"succeeded", "failed"})["mode"] == "immediate"
    assert provider_calls(stack) == 2
    rows = ledger_rows(stack, [*ids, later, off])
    assert len(rows) == 22  # one row per task: no double billing
    assert sum((r[2] for r in rows), Decimal(0)) == sum((r[2] for r in rows if r[1] == "immediate"), Decimal(0))


def tenant_of(stack: Stack, task_id: str) -> uuid.UUID:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT tenant_id FROM tasks WHERE id = %s", (uuid.UUID(task_id),)).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def expire_entries(stack: Stack, tenant_id: uuid.UUID) -> None:
    """Time passes: the tenant's cache entries are past their TTL."""
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        conn.execute("UPDATE response_cache SET expires_at = now() - interval '1 second' WHERE tenant_id = %s",
                     (tenant_id,))


def test_ttl_expiry_calls_the_provider_again(sim_reset: Stack, openai_sdk: Sdk) -> None:
    stack = sim_reset
    client = openai_sdk(stack.new_tenant_key())
    question = "List three primary colours."
    tenant_id = tenant_of(stack, ask(client, question, temperature=0).headers["x-tierbatch-task-id"])
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        [(status, ttl)] = conn.execute(
            "SELECT status::text, extract(epoch FROM expires_at - created_at) FROM response_cache "
            "WHERE tenant_id = %s", (tenant_id,)).fetchall()
    assert status == "ready" and round(float(ttl)) == 86_400  # [cache] ttl_seconds (the default)
    assert ask(client, question, temperature=0).headers["x-tierbatch-cache"] == "hit"
    expire_entries(stack, tenant_id)
    assert ask(client, question, temperature=0).headers["x-tierbatch-cache"] == "miss"
    assert provider_calls(stack) == 2
    assert ask(client, question, temperature=0).headers["x-tierbatch-cache"] == "hit"  # refreshed in place


def test_expired_entries_are_purged(sim_reset: Stack, openai_sdk: Sdk) -> None:
    stack = sim_reset
    client = openai_sdk(stack.new_tenant_key())
    tenant_id = tenant_of(stack, ask(client, "What is two plus two?", temperature=0).headers["x-tierbatch-task-id"])

    def entries() -> int:
        with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
            row = conn.execute("SELECT count(*) FROM response_cache WHERE tenant_id = %s", (tenant_id,)).fetchone()
        return int(row[0]) if row else -1

    assert entries() == 1
    expire_entries(stack, tenant_id)

    def purged() -> bool:
        return entries() == 0

    wait_until(purged, 20, 0.2, "the reconciler purges the expired entry")


def test_batch_answers_fill_the_cache(sim_reset: Stack) -> None:
    stack = sim_reset
    task = {"prompt": "Classify the tone: thanks for the quick fix", "task_type": "tone",
            "params": {"temperature": 0}}
    with stack.client(stack.new_tenant_key()) as client:
        [first] = submit(client, [task])
        batched = stack.wait_for_task(client, first, {"succeeded", "failed"}, timeout=60)
        assert (batched["status"], batched["mode"]) == ("succeeded", "batch")
        [again] = submit(client, [{**task, "urgent": True}])
        cached = stack.wait_for_task(client, again, {"succeeded", "failed"})
    assert (cached["mode"], Decimal(str(cached["cost_usd"]))) == ("cache", 0)
    assert cached["output"] == batched["output"]
    stats = stack.sim("GET", "/_sim/stats")
    assert (stats["batch_lines"], provider_calls(stack)) == (1, 0)
