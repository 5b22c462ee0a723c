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
from tierbatch.quality.monitor import sample_points, sampled

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


def _prepared_watch(session: Session, shadow_rate: float, probe_rate: float, ids: list[uuid.UUID]
                    ) -> tuple[list[uuid.UUID], bytes]:
    """What ingestion's reading of a chunk names for the quality monitor, and its COPY rows."""
    data = default_config_data()
    data["quality"] = {"shadow_rate": shadow_rate, "probe_rate": probe_rate}
    config = parse_config(data)
    body = {"model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}
    prepared = prepare_outcomes(session, PriceBook(config), ProviderBatch(provider="sim", model="gpt-4o-mini"),
                                LineOutcomes(successes=dict.fromkeys(ids, body)), config.quality)
    return prepared.watch, prepared.copy_data


def test_ingestion_names_the_tasks_that_may_be_sampled_and_never_a_shadow_task(session: Session) -> None:
    """Ingestion reads a chunk's candidates in the statement that reads its requests: a light task by its
    shadow draw, any other by its probe draw (the only extra call `shadow_tier_for` can give each), never
    a shadow task; and the chunk's COPY rows are those it writes without sampling."""
    light = add_tasks(session, [ticket(i) for i in range(500)])
    complex_ = add_tasks(session, [ticket(i) for i in range(500, 1000)], tier="complex")
    points = sample_points(session, light + complex_)
    expected = ({t for t in light if sampled(points[t].shadow, 0.2)}
                | {t for t in complex_ if sampled(points[t].probe, 0.1)})
    watch, copy_data = _prepared_watch(session, 0.2, 0.1, light + complex_)
    assert set(watch) == expected and len(watch) == len(expected)
    assert expected & set(light) and expected & set(complex_) and len(expected) < 1000
    shadows = add_tasks(session, [ticket(i) for i in range(500)], shadows_of=light)
    assert _prepared_watch(session, 0.2, 0.1, shadows)[0] == []  # equal requests, but shadow tasks
    assert set(_prepared_watch(session, 1.0, 0.0, light + complex_)[0]) == set(light)
    unsampled, unsampled_copy = _prepared_watch(session, 0.0, 0.0, light + complex_)
    assert unsampled == [] and unsampled_copy == copy_data
