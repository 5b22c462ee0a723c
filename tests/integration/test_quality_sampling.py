"""The quality monitor's sample drawn from each task's stored request: the share is the configured
rate, equal requests draw alike whatever their ids (so a workload submitted again is sampled again the
same way), shadows and probes draw apart, and shadow tasks are never sampled themselves.

Rows are written in one transaction that is rolled back: nothing is left in the session database."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.batching.ingest import LineOutcomes, prepare_outcomes
from tierbatch.db.models import ProviderBatch, Task, Tenant
from tierbatch.ledger.pricing import PriceBook
from tierbatch.quality.monitor import maybe_sampled_ids, sample_points, sampled

pytestmark = pytest.mark.integration

TASKS = 4000
RATE = 0.05
TENANT = uuid.uuid4()


def add_tasks(session: Session, requests: list[dict[str, Any]],
              shadows_of: list[uuid.UUID] | None = None, tier: str = "light") -> list[uuid.UUID]:
    tenant = session.get(Tenant, TENANT) or Tenant(id=TENANT, name="sampling")
    session.add(tenant)
    session.flush()
    ids = [uuid.uuid4() for _ in requests]
    session.execute(insert(Task), [
        {"id": task_id, "tenant_id": TENANT, "task_type": "classification", "requested_tier": tier,
         "tier": tier, "tier_reason": "explicit", "urgent": False, "request": request, "status": "queued",
         "attempts": 0, "shadow_of": shadows_of[i] if shadows_of else None}
        for i, (task_id, request) in enumerate(zip(ids, requests, strict=True))])
    return ids


def ticket(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Route the ticket."},
                         {"role": "user", "content": f"Ticket {i}: I was charged twice"}], "temperature": 0}


def test_the_sample_is_the_rate_and_follows_the_request_not_the_id(session: Session) -> None:
    ids = add_tasks(session, [ticket(i) for i in range(TASKS)])
    points = sample_points(session, ids)
    assert set(points) == set(ids)
    share = sum(sampled(p.shadow, RATE) for p in points.values()) / TASKS
    probes = sum(sampled(p.probe, RATE) for p in points.values()) / TASKS
    tolerance = 4 * math.sqrt(RATE * (1 - RATE) / TASKS)
    assert abs(share - RATE) < tolerance and abs(probes - RATE) < tolerance, (share, probes)
    assert all(0.0 <= p.shadow < 1.0 and 0.0 <= p.probe < 1.0 for p in points.values())
    # shadows and probes are separate draws
    assert sum(sampled(p.shadow, 0.5) == sampled(p.probe, 0.5) for p in points.values()) < TASKS * 0.55

    # the same requests again, under new ids and with their keys in another order: the same draws
    reordered = [{"temperature": 0, "messages": [{"content": m["content"], "role": m["role"]}
                                                 for m in ticket(i)["messages"]]} for i in range(200)]
    again = sample_points(session, add_tasks(session, reordered))
    assert sorted((p.shadow, p.probe) for p in again.values()) == \
        sorted((points[ids[i]].shadow, points[ids[i]].probe) for i in range(200))


def test_maybe_sampled_ids_keeps_the_sampled_tasks_and_never_a_shadow_task(session: Session) -> None:
    data = default_config_data()
    data["quality"] = {"shadow_rate": 0.2, "probe_rate": 0.1}
    config = parse_config(data)
    ids = add_tasks(session, [ticket(i) for i in range(500)])
    points = sample_points(session, ids)
    # a light task may only be shadowed (its shadow draw), any other only probed (its probe draw)
    expected = {task_id for task_id, p in points.items() if sampled(p.shadow, 0.2)}
    assert set(maybe_sampled_ids(session, config, ids)) == expected and 0 < len(expected) < 500
    complex_ids = add_tasks(session, [ticket(i) for i in range(500, 1000)], tier="complex")
    complex_points = sample_points(session, complex_ids)
    probed = {task_id for task_id, p in complex_points.items() if sampled(p.probe, 0.1)}
    assert set(maybe_sampled_ids(session, config, complex_ids)) == probed and 0 < len(probed) < 500
    shadows = add_tasks(session, [ticket(i) for i in range(500)], shadows_of=ids)
    assert maybe_sampled_ids(session, config, shadows) == []  # equal requests, but shadow tasks
    data["quality"] = {"shadow_rate": 1.0, "probe_rate": 0.0}
    assert set(maybe_sampled_ids(session, parse_config(data), ids)) == set(ids)
    data["quality"] = {"shadow_rate": 0.0, "probe_rate": 0.0}
    assert maybe_sampled_ids(session, parse_config(data), ids) == []


def test_ingestion_reads_the_monitors_candidates_with_its_chunks_requests(session: Session) -> None:
    """Ingestion asks for a chunk's candidates in the statement that reads the chunk's requests: the same
    tasks `maybe_sampled_ids` names, and the same COPY rows as without sampling."""
    data = default_config_data()
    data["quality"] = {"shadow_rate": 0.2, "probe_rate": 0.1}
    config = parse_config(data)
    ids = add_tasks(session, [ticket(i) for i in range(600)])
    ids += add_tasks(session, [ticket(i) for i in range(600, 800)], tier="complex")
    body = {"model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}
    outcomes = LineOutcomes(successes=dict.fromkeys(ids, body))
    batch = ProviderBatch(provider="sim", model="gpt-4o-mini")
    prepared = prepare_outcomes(session, PriceBook(config), batch, outcomes, config.quality)
    expected = maybe_sampled_ids(session, config, ids)
    assert sorted(prepared.watch) == sorted(expected) and 0 < len(expected) < len(ids)
    unsampled = prepare_outcomes(session, PriceBook(config), batch, outcomes)
    assert unsampled.watch == [] and unsampled.copy_data == prepared.copy_data
