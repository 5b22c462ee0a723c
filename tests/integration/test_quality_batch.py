"""Shadow comparisons of batch-path Light tasks: non-urgent labelled classification
goes through a provider batch; after each ingested chunk, the tasks the stable hash samples get a shadow
task, which goes through a provider batch of the complex model in turn (non-urgent: the batch price); a
poor cheap model promotes the task type; shadow spend is a `shadow` ledger row of the shadowed task.

A stack of its own (simulator, API, worker, beat) on a database of its own: the session stack's batch
assembler would otherwise claim these tasks and ingest them with its config (no shadows). The config
samples half of the tasks (shadow and probe alike), so the test also checks that exactly the tasks the
hash of their requests picks get a shadow, and that probe-only picks of Light tasks get none.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from tests.integration.conftest import SIM_BATCH_DEFAULTS, SIM_DEFAULTS
from tests.support.procs import wait_until
from tests.support.quality import quality_row
from tests.support.stack import Stack, own_stack, psycopg_dsn, write_app_config
from tierbatch.base.config import load_config
from tierbatch.batching.ingest import LineOutcomes, ingest_outcomes
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import ProviderBatch, Task
from tierbatch.ledger.pricing import PriceBook
from tierbatch.quality.monitor import SamplePoints, sample_points, sampled

pytestmark = pytest.mark.integration

RATE = 0.5
QUALITY = f"""
[quality]
shadow_rate = {RATE}
probe_rate = {RATE}
min_samples = 10
window = 20
promote_below = 0.9
demote_above = 0.95
"""
LABELS = ["positive", "negative", "neutral"]
ITEMS = 60  # about 30 sampled (the items' texts are fixed, so the same ones in every run)


@pytest.fixture(scope="module")
def bstack(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(base_database_url, Path(tmp_path_factory.mktemp("quality-batch")), "tierbatch_qbatch",
                   lambda path, port: write_app_config(path, port, QUALITY)) as own:
        yield own


def simulate(stack: Stack, light_agreement: float, complex_errors: float = 0.0) -> None:
    """Fast batches; the complex model is the reference, the light one agrees at `light_agreement`."""
    stack.sim("POST", "/_sim/config", {"batch": SIM_BATCH_DEFAULTS, "models": {
        **SIM_DEFAULTS, "gpt-4o": {"reference": True, "error_rate": complex_errors, "retry_after_seconds": 0.05},
        "gpt-4o-mini": {"agreement": light_agreement}}})
    stack.sim("POST", "/_sim/reset")


def run_job(stack: Stack, client: httpx.Client, task_type: str, tier: str) -> list[dict[str, Any]]:
    """A non-urgent labelled classification job; waits until every task is terminal."""
    created = client.post("/v1/jobs", json={
        "name": f"reviews-{task_type}", "task_type": task_type, "tier": tier, "urgent": False,
        "system": "Classify the sentiment of the customer review.", "template": "Review: {text}",
        "labels": LABELS,
        "items": [{"id": f"r{i}", "text": f"Review {task_type} #{i}: the parcel came on time, the box was dented."}
                  for i in range(ITEMS)],
    })
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    def tasks() -> list[dict[str, Any]]:
        return list(client.get("/v1/tasks", params={"job_id": job_id, "limit": 1000}).json()["data"])

    def finished() -> bool:
        rows = tasks()
        return len(rows) == ITEMS and all(t["status"] in ("succeeded", "failed", "cancelled") for t in rows)

    try:
        wait_until(finished, 90, 0.2, "the job's tasks")
    except TimeoutError:
        raise AssertionError(f"tasks: {[t['status'] for t in tasks()]}\n"
                             f"worker log:\n{stack.processes['worker'].log_text()[-5000:]}") from None
    rows = tasks()
    assert {(t["status"], t["mode"], t["tier"]) for t in rows} == {("succeeded", "batch", "light")}, rows
    return rows


def draws(stack: Stack, task_ids: list[str]) -> dict[str, SamplePoints]:
    """Each task's shadow and probe draws, from its stored request."""
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            points = sample_points(session, [uuid.UUID(t) for t in task_ids])
    finally:
        engine.dispose()
    return {str(task_id): p for task_id, p in points.items()}


def comparisons(stack: Stack, task_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute("SELECT task_id, agreed, shadow_tier::text, light_model, complex_model "
                            "FROM quality_comparisons WHERE task_id = ANY(%s)",
                            ([uuid.UUID(t) for t in task_ids],)).fetchall()
    return {str(row[0]): tuple(row[1:]) for row in rows}


def wait_comparisons(stack: Stack, task_ids: list[str], expected: int) -> dict[str, tuple[Any, ...]]:
    try:
        wait_until(lambda: len(comparisons(stack, task_ids)) >= expected, 60, 0.2, f"{expected} comparisons")
    except TimeoutError:
        raise AssertionError(f"comparisons: {comparisons(stack, task_ids)}\n"
                             f"worker log:\n{stack.processes['worker'].log_text()[-5000:]}") from None
    return comparisons(stack, task_ids)


def ledger(stack: Stack, task_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """Per task: (its cost equals the sum of its ledger rows, batch rows, shadow rows, other rows)."""
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute(
            "SELECT t.id, t.cost_usd = sum(l.cost_usd), count(*) FILTER (WHERE l.mode = 'batch'), "
            "count(*) FILTER (WHERE l.mode = 'shadow'), count(*) FILTER (WHERE l.mode NOT IN ('batch', 'shadow')) "
            "FROM tasks t JOIN ledger_entries l ON l.task_id = t.id WHERE t.id = ANY(%s) GROUP BY t.id, t.cost_usd",
            ([uuid.UUID(t) for t in task_ids],)).fetchall()
    return {str(row[0]): tuple(row[1:]) for row in rows}


def shadow_tasks(stack: Stack, task_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """Per shadowed task: (its shadow task's id, status, model, whether it went through a provider batch)."""
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute("SELECT shadow_of, id::text, status::text, model, batch_id IS NOT NULL FROM tasks "
                            "WHERE shadow_of = ANY(%s)", ([uuid.UUID(t) for t in task_ids],)).fetchall()
    return {str(row[0]): tuple(row[1:]) for row in rows}


@contextlib.contextmanager
def complex_batches_held(stack: Stack) -> Iterator[None]:
    """Hold the batch assembler's lock of the complex model's group: shadow tasks stay `waiting_batch`."""
    with psycopg.connect(psycopg_dsn(stack.database_url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('tierbatch.assemble:sim/gpt-4o'))")
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('tierbatch.assemble:sim/gpt-4o'))")


def test_batch_results_are_shadowed_and_poor_agreement_promotes(bstack: Stack) -> None:
    stack = bstack
    simulate(stack, light_agreement=0.4)
    with stack.client(stack.new_tenant_key()) as client:
        # tier auto: config [routing] sends classification to light, until the quality loop says otherwise
        rows = run_job(stack, client, "classification", "auto")
        ids = [t["id"] for t in rows]
        points = draws(stack, ids)
        picked = [t for t in ids if sampled(points[t].shadow, RATE)]
        probe_only = [t for t in ids if sampled(points[t].probe, RATE) and not sampled(points[t].shadow, RATE)]
        assert len(picked) >= 10 and probe_only, (len(picked), len(probe_only))
        found = wait_comparisons(stack, ids, len(picked))
        # exactly the stable hash's sample, each compared once against the complex model
        assert sorted(found) == sorted(picked)
        assert {c[1:] for c in found.values()} == {("complex", "gpt-4o-mini", "gpt-4o")}
        assert None not in {c[0] for c in found.values()}

        # the poor cheap model promoted the task type; the event carries its figures
        row = wait_until(lambda: (r := quality_row(client, "classification"))["tier"] == "complex" and r, 30, 0.2,
                         "promotion")
        assert isinstance(row, dict)
        [event] = row["events"]
        assert (event["action"], event["actor"], event["from_tier"], event["to_tier"]) == \
            ("promote", "quality", "light", "complex")
        assert event["figures"]["samples"] >= 10 and event["figures"]["agreement"] < 0.9
        assert row["source"] == "quality" and Decimal(row["shadow_cost_usd"]) > 0

        # shadow spend: one `shadow` row per sampled task, beside its one `batch` row; cost = sum of rows
        billed = ledger(stack, ids)
        assert len(billed) == ITEMS
        for task_id, figures in billed.items():
            assert figures == (True, 1, 1 if task_id in found else 0, 0), (task_id, figures)
        costs = client.get("/v1/costs", params={"group_by": "mode"}).json()
        by_mode = {r["mode"]: r for r in costs["rows"]}
        assert by_mode["shadow"]["requests"] == len(picked) and Decimal(by_mode["shadow"]["cost_usd"]) > 0
        assert by_mode["batch"]["requests"] == ITEMS

        # nothing called twice: one batch line per task, one more per sampled task (its shadow, batched
        # on the complex model); no immediate call at all
        stats = stack.sim("GET", "/_sim/stats")
        assert stats["batch_lines"] == ITEMS + len(picked)
        assert stats["chat_calls"] == {}
        shadows = shadow_tasks(stack, picked)
        assert len(shadows) == len(picked)
        assert {(s[1], s[2], s[3]) for s in shadows.values()} == {("succeeded", "gpt-4o", True)}
        # the monitor's tasks are not the tenant's: not listed, not readable
        listed = {t["id"] for t in client.get("/v1/tasks", params={"limit": 1000}).json()["data"]}
        assert listed == set(ids)
        assert client.get(f"/v1/tasks/{next(iter(shadows.values()))[0]}").status_code == 404

        # promoted: new classification tasks of this tenant go to the complex model
        routes = {r["task_type"]: r for r in client.get("/v1/routes").json()["data"]}
        assert (routes["classification"]["tier"], routes["classification"]["source"]) == ("complex", "quality")
        after = client.post("/v1/tasks", json={"prompt": "Is this review positive? Labels: yes, no",
                                               "task_type": "classification"})
        assert after.status_code == 202 and after.json()["tier"] == "complex", after.text

    # ingesting the same lines again writes nothing and samples nothing
    config = load_config(stack.config_path)
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            batch_id = session.scalar(select(Task.batch_id).where(Task.id == uuid.UUID(picked[0])))
            batch = session.get(ProviderBatch, batch_id)
            assert batch is not None
            body = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 20, "completion_tokens": 5},
                    "choices": [{"message": {"role": "assistant", "content": '{"label": "positive"}'}}]}
            again = LineOutcomes(successes={uuid.UUID(t): body for t in picked})
            result = ingest_outcomes(session, config, PriceBook(config), batch, again,
                                     [uuid.UUID(t) for t in picked])
            assert (result.written, result.succeeded) == (0, [])
    finally:
        engine.dispose()


def test_provider_errors_on_batch_shadows_count_for_nothing(bstack: Stack) -> None:
    stack = bstack
    simulate(stack, light_agreement=0.4)
    with stack.client(stack.new_tenant_key()) as client:
        with complex_batches_held(stack):
            rows = run_job(stack, client, "reviews", "light")
            ids = [t["id"] for t in rows]
            points = draws(stack, ids)
            picked = [t for t in ids if sampled(points[t].shadow, RATE)]
            wait_until(lambda: len(shadow_tasks(stack, picked)) == len(picked), 30, 0.2, "shadow tasks")
            # every line of the shadows' batches fails from now on (the originals are all done)
            stack.sim("POST", "/_sim/config", {"batch": {"line_error_rate": 1.0}})
        found = wait_comparisons(stack, ids, len(picked))
        shadows = shadow_tasks(stack, picked)
        assert {s[1] for s in shadows.values()} == {"failed"}  # after their retries
        assert sorted(found) == sorted(picked)
        assert {c[0] for c in found.values()} == {None}  # errors: recorded, never counted
        row = quality_row(client, "reviews")
        assert (row["samples"], row["provider_errors"], row["events"]) == (0, len(picked), [])
        assert row["shadow_cost_usd"] is None
        assert all(r["task_type"] != "reviews" for r in client.get("/v1/routes").json()["data"])
        billed = ledger(stack, ids)
        assert set(billed.values()) == {(True, 1, 0, 0)}  # no shadow row without a shadow answer
