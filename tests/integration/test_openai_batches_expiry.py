"""Expiry of Batch API facade batches (OpenAI's 24 h completion window), driven with the real `openai` SDK.

Time passes in the database: a test moves the batch's `expires_at` to the past, and the beat step
(`tierbatch.facade.expire`) does the rest. A batch past its window cancels its lines not started yet,
waits for the lines already at a provider (their cost is real), then ends `expired`: completed lines
in the output file, the cancelled ones as `batch_expired` lines in the error file, billed nothing.

To keep a Light line on the batch path deterministic, a test holds the batch assembler's advisory lock
for the (provider, model) group: the assembler then claims nothing for it
(tierbatch/batching/assemble.py `claim_batch`).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.integration.test_openai_batches import (
    COMPLEX_PROMPT,
    LIGHT_PROMPT,
    _clients,
    create_batch,
    jsonl,
    line,
    output_lines,
    retrieve,
    sdk,
    tenant_rows,
    upload,
    wait_for_batch,
)
from tests.support.openapi import validate
from tests.support.procs import wait_until
from tests.support.stack import Stack, advisory_lock_held, psycopg_dsn
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.openai_batches.expiry import expire_batch

pytestmark = pytest.mark.integration

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
LIGHT_GROUP = "tierbatch.assemble:sim/gpt-4o-mini"  # the assembler's lock key for the Light tier's group


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@contextlib.contextmanager
def assembler_held(stack: Stack, key: str = LIGHT_GROUP) -> Iterator[None]:
    """Hold the batch assembler's lock of one (provider, model) group: its waiting tasks stay waiting."""
    with advisory_lock_held(stack, "hashtext(%s)", key):
        yield


def task_states(stack: Stack, batch_id: str) -> dict[str, str]:
    rows = tenant_rows(stack, "SELECT t.item_id, t.status::text FROM tasks t JOIN client_batches b "
                              "ON b.job_id = t.job_id WHERE b.id = %s", batch_id)
    return {str(custom_id): str(status) for custom_id, status in rows}


def billing(stack: Stack, batch_id: str) -> dict[str, tuple[int, Any]]:
    """custom_id → (non-shadow ledger rows, the task's cost_usd)."""
    rows = tenant_rows(stack, "SELECT t.item_id, count(l.id) FILTER (WHERE l.mode <> 'shadow'), t.cost_usd "
                              "FROM tasks t JOIN client_batches b ON b.job_id = t.job_id "
                              "LEFT JOIN ledger_entries l ON l.task_id = t.id WHERE b.id = %s "
                              "GROUP BY t.item_id, t.cost_usd", batch_id)
    return {str(custom_id): (int(count), cost) for custom_id, count, cost in rows}


def move_window_to_the_past(stack: Stack, batch_id: str) -> None:
    """Simulate the 24 hours passing: the window ended a second ago."""
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        moved = conn.execute("UPDATE client_batches SET expires_at = now() - interval '1 second' "
                             "WHERE id = %s AND status = 'in_progress'", (batch_id,)).rowcount
    assert moved == 1


def batch_files(stack: Stack, batch_id: str) -> list[str]:
    rows = tenant_rows(stack, "SELECT filename FROM files WHERE filename LIKE %s ORDER BY 1", f"{batch_id}_%")
    return [str(name) for (name,) in rows]


def wait_for_states(stack: Stack, batch_id: str, expected: dict[str, str], timeout: float = 30) -> None:
    wait_until(lambda: task_states(stack, batch_id) == expected, timeout, interval=0.1,
               message=f"tasks of {batch_id} in {expected}")


def check_expired_lines(errors: list[dict[str, Any]], custom_ids: set[str]) -> None:
    expired = {e["custom_id"]: e for e in errors if (e.get("error") or {}).get("code") == "batch_expired"}
    assert set(expired) == custom_ids, (sorted(expired), sorted(custom_ids))
    for item in expired.values():
        assert item["response"] is None and item["error"]["message"] == EXPIRED_MESSAGE
        assert item["id"].startswith("batch_req_")


def test_expiry_waits_for_lines_at_the_provider_and_expires_the_rest(sim_reset: Stack) -> None:
    stack = sim_reset
    # a slow provider batch that itself expires with half of its lines answered
    stack.sim("POST", "/_sim/config", {"batch": {"in_progress_seconds": 6, "expire": True,
                                                 "expire_completed_share": 0.5}})
    client = sdk(stack.api_url, stack.new_tenant_key("batch-expiry"))
    run = uuid.uuid4().hex[:8]  # fresh prompts: no response-cache hits from other tests
    light_ids = [f"light-{i}" for i in range(4)]
    requests = [line("complex-0", f"{COMPLEX_PROMPT} {run}", metadata={"tier": "complex"}),
                *(line(cid, f"{LIGHT_PROMPT} {run} {cid}", metadata={"tier": "light"}) for cid in light_ids)]
    batch = create_batch(client, upload(client, jsonl(requests))["id"])
    batch_id = batch["id"]
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600  # the window stays OpenAI's 24 h

    # the complex line is answered at once; the light lines sit in a provider batch
    wait_for_states(stack, batch_id, {"complex-0": "succeeded", **dict.fromkeys(light_ids, "in_batch")})
    move_window_to_the_past(stack, batch_id)

    expiring = wait_for_batch(client, batch_id, {"finalizing", "expired", "completed"}, timeout=30)
    assert expiring["status"] == "finalizing", expiring  # waiting for the lines at the provider
    assert "finalizing_at" in expiring and "expired_at" not in expiring
    assert expiring["request_counts"] == {"total": 5, "completed": 1, "failed": 0}
    with pytest.raises(openai.ConflictError):  # an expiring batch ends `expired`, not `cancelled`
        client.batches.cancel(batch_id)

    # lines back from the provider batch are cancelled by the next expiry step; the held assembler
    # lock keeps the race with a new claim out of this test
    with assembler_held(stack):
        done = wait_for_batch(client, batch_id, {"expired", "completed", "cancelled", "failed"}, timeout=60)
    assert done["status"] == "expired", done
    states = task_states(stack, batch_id)
    answered = {cid for cid in light_ids if states[cid] == "succeeded"}
    cut_off = {cid for cid in light_ids if states[cid] == "cancelled"}
    assert len(answered) == 2 and answered | cut_off == set(light_ids), states  # the provider's share

    assert done["expired_at"] >= done["expires_at"] and done["expired_at"] >= done["finalizing_at"]
    assert "completed_at" not in done and "cancelled_at" not in done
    assert done["request_counts"] == {"total": 5, "completed": 1 + len(answered), "failed": 0}
    outputs = output_lines(client, done.get("output_file_id"))
    errors = output_lines(client, done.get("error_file_id"))
    assert sorted(o["custom_id"] for o in outputs) == sorted({"complex-0"} | answered)
    for item in outputs:
        assert item["error"] is None and item["response"]["status_code"] == 200
        validate(item["response"]["body"], "CreateChatCompletionResponse")
    assert {o["custom_id"]: o["response"]["body"]["model"] for o in outputs}["complex-0"] == "gpt-4o"
    check_expired_lines(errors, cut_off)
    assert len(errors) == len(cut_off)

    # billed: what completed, once; the expired lines nothing
    billed = billing(stack, batch_id)
    for cid in {"complex-0"} | answered:
        assert billed[cid][0] == 1 and billed[cid][1] is not None, (cid, billed[cid])
    for cid in cut_off:
        assert billed[cid] == (0, None), (cid, billed[cid])
    assert done["usage"]["output_tokens"] > 0
    # nothing went to the provider again, and the provider batch is over: nothing can change the batch
    stats = stack.sim("GET", "/_sim/stats")
    assert stats["batch_lines"] == len(light_ids) and stats["chat_calls"] == {"gpt-4o": 1}
    assert tenant_rows(stack, "SELECT count(*) FROM provider_batches p WHERE p.status NOT IN ('done', 'failed') "
                              "AND p.id IN (SELECT t.batch_id FROM tasks t JOIN client_batches b "
                              "ON b.job_id = t.job_id WHERE b.id = %s)", batch_id) == [(0,)]
    assert retrieve(client, batch_id) == done and billing(stack, batch_id) == billed
    assert batch_files(stack, batch_id) == [f"{batch_id}_error.jsonl", f"{batch_id}_output.jsonl"]
    with pytest.raises(openai.ConflictError) as final:
        client.batches.cancel(batch_id)
    validate(final.value.response.json(), "ErrorResponse")


def test_lines_not_started_expire_at_once_and_exactly_once(sim_reset: Stack) -> None:
    stack = sim_reset
    client = sdk(stack.api_url, stack.new_tenant_key("batch-expiry-waiting"))
    run = uuid.uuid4().hex[:8]
    light_ids = [f"wait-{i}" for i in range(5)]
    requests = [line("complex-0", f"{COMPLEX_PROMPT} {run}", metadata={"tier": "complex"}),
                *(line(cid, f"Label this: fine {run} {cid}", metadata={"tier": "light"}) for cid in light_ids)]
    engine = make_engine(stack.database_url)
    sessions: sessionmaker[Session] = make_session_factory(engine)
    try:
        with assembler_held(stack):  # the light lines wait for a provider batch that is not formed
            batch_id = create_batch(client, upload(client, jsonl(requests))["id"])["id"]
            wait_for_states(stack, batch_id, {"complex-0": "succeeded", **dict.fromkeys(light_ids, "waiting_batch")})
            move_window_to_the_past(stack, batch_id)

            # expiry steps racing each other (and the beat's): the batch expires exactly once
            outcomes: list[str | None] = []
            start = threading.Barrier(3)

            def step() -> None:
                start.wait()
                with sessions.begin() as session:
                    outcomes.append(expire_batch(session, batch_id))

            threads = [threading.Thread(target=step) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert outcomes.count("expired") <= 1 and set(outcomes) <= {"expired", None}, outcomes

            done = wait_for_batch(client, batch_id, {"expired", "completed", "cancelled", "failed"}, timeout=30)
            assert set(task_states(stack, batch_id).values()) == {"succeeded", "cancelled"}
        assert done["status"] == "expired", done
        assert done["request_counts"] == {"total": 6, "completed": 1, "failed": 0}
        assert done["expired_at"] >= done["expires_at"]
        outputs = output_lines(client, done.get("output_file_id"))
        errors = output_lines(client, done.get("error_file_id"))
        assert [o["custom_id"] for o in outputs] == ["complex-0"]
        check_expired_lines(errors, set(light_ids))
        assert len(errors) == len(light_ids)
        assert batch_files(stack, batch_id) == [f"{batch_id}_error.jsonl", f"{batch_id}_output.jsonl"]

        billed = billing(stack, batch_id)
        assert billed["complex-0"][0] == 1
        assert all(billed[cid] == (0, None) for cid in light_ids), billed
        # cancelled lines are never claimed, now that the assembler runs again: no provider batch at all
        assert tenant_rows(stack, "SELECT count(*) FROM tasks t JOIN client_batches b ON b.job_id = t.job_id "
                                  "WHERE b.id = %s AND t.batch_id IS NOT NULL", batch_id) == [(0,)]
        assert stack.sim("GET", "/_sim/stats")["batch_lines"] == 0
        with sessions.begin() as session:  # a later step finds nothing to do
            assert expire_batch(session, batch_id) is None
        assert retrieve(client, batch_id) == done
        listed = [b for b in client.batches.list() if b.id == batch_id]
        assert len(listed) == 1 and listed[0].status == "expired" and listed[0].expired_at == done["expired_at"]
    finally:
        engine.dispose()
