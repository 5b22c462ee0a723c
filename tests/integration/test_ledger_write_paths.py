"""Each of the three paths that write ledger rows stores cache writes (tokens, price, cost) and the batch
discount mark: the ORM row (`add_ledger_entry`), the gateway's group commit (`CallWriter`) and batch
ingestion's COPY (`ingest_outcomes`); the rollup and the cost views carry the cache writes on.

Figures by hand from genai-prices 0.2.3's table: claude-3-5-haiku $0.80 input, $0.08 cache read, $1.00 cache
write, $4 output per 1M, with no batch price of its own (the provider's 50% batch discount applies);
claude-haiku-4-5 $1 / $0.10 / $1.25 / $5, batch $0.50 / $0.05 / $0.625 / $2.50."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.support.stack import psycopg_dsn, scratch_database
from tierbatch.base.config import AppConfig, default_config_data, parse_config
from tierbatch.base.states import BatchStatus, Mode, RequestedTier, TaskStatus, Tier
from tierbatch.batching.ingest import LineOutcomes, ingest_outcomes
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import LedgerDaily, LedgerEntry, ProviderBatch, Task
from tierbatch.gateway.recorder import CallRecord, CallWriter, call_costs
from tierbatch.gateway.routing import Route
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.ledger.rows import ResponseRecord, add_ledger_entry
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.tenants.store import create_tenant

pytestmark = pytest.mark.integration

# 10,000 input tokens: 2,000 read from the prompt cache, 1,000 written to it, 7,000 at the input rate
USAGE = TokenUsage(input_tokens=10_000, cached_tokens=2_000, output_tokens=1_000, cache_write_tokens=1_000)
BODY_USAGE = {"prompt_tokens": 10_000, "completion_tokens": 1_000,
              "prompt_tokens_details": {"cached_tokens": 2_000, "cache_write_tokens": 1_000}}

# (cache_write_tokens, cache_write_price, cache_write_cost_usd, batch_discount, cost_usd)
HAIKU_3_5_BATCH = (1_000, Decimal("0.5"), Decimal("0.0005"), Decimal("0.5"),
                   Decimal("0.00538"))  # half of 7,000 × 0.80 + 2,000 × 0.08 + 1,000 × 1 + 1,000 × 4
HAIKU_4_5_BATCH = (1_000, Decimal("0.625"), Decimal("0.000625"), None,
                   Decimal("0.006725"))  # 7,000 × 0.50 + 2,000 × 0.05 + 1,000 × 0.625 + 1,000 × 2.50
HAIKU_4_5_IMMEDIATE = (1_000, Decimal("1.25"), Decimal("0.00125"), None,
                       Decimal("0.01345"))  # 7,000 × 1 + 2,000 × 0.10 + 1,000 × 1.25 + 1,000 × 5


@pytest.fixture(scope="module")
def database(base_database_url: str) -> Iterator[str]:
    with scratch_database(base_database_url, prefix="tierbatch_ledger_paths") as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture(scope="module")
def engine(database: str) -> Iterator[Engine]:
    created = make_engine(database)
    try:
        yield created
    finally:
        created.dispose()


@pytest.fixture(scope="module")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture(scope="module")
def config() -> AppConfig:
    data = default_config_data()
    data["providers"]["anthropic"] = {"kind": "anthropic", "base_url": "https://anthropic.invalid",
                                      "prices_from": "anthropic", "batch_discount": 0.5}
    return parse_config(data, environ={})


def new_tenant(sessions: sessionmaker[Session]) -> uuid.UUID:
    with sessions.begin() as session:
        return create_tenant(session, f"ledger-paths-{uuid.uuid4().hex[:8]}").id


def task_row(tenant: uuid.UUID, status: TaskStatus, **extra: Any) -> Task:
    return Task(id=uuid.uuid4(), tenant_id=tenant, task_type="classification", requested_tier=RequestedTier.AUTO,
                tier=Tier.LIGHT, tier_reason="test", urgent=False, request={"messages": []}, status=status,
                attempts=1, **extra)


def figures(sessions: sessionmaker[Session], task_id: uuid.UUID) -> tuple[Any, ...]:
    with sessions() as session:
        e = session.scalars(select(LedgerEntry).where(LedgerEntry.task_id == task_id)).one()
        assert e.cached_tokens == 2_000 and e.input_tokens == 10_000 and not e.unpriced
        return (e.cache_write_tokens, e.cache_write_price, e.cache_write_cost_usd, e.batch_discount, e.cost_usd)


def rollup_and_view(sessions: sessionmaker[Session], tenant: uuid.UUID) -> tuple[Any, ...]:
    with sessions() as session:
        daily = session.execute(select(func.sum(LedgerDaily.cache_write_tokens),
                                       func.sum(LedgerDaily.cache_write_cost_usd))
                                .where(LedgerDaily.tenant_id == tenant)).one()
        view = session.execute(text(
            "SELECT sum(cache_write_tokens), sum(cache_write_cost_usd), sum(uncached_input_tokens) FROM cost_ledger "
            "WHERE tenant_id = :t"), {"t": tenant}).one()
        by_day = session.execute(text(
            "SELECT sum(cache_write_tokens), sum(cache_write_cost_usd) FROM cost_by_day WHERE tenant_id = :t"),
            {"t": tenant}).one()
        return tuple(daily), tuple(view), tuple(by_day)


def test_orm_path(sessions: sessionmaker[Session], config: AppConfig) -> None:
    tenant = new_tenant(sessions)
    with sessions.begin() as session:
        task = task_row(tenant, TaskStatus.SUCCEEDED, finished_at=datetime.now(UTC), mode=Mode.BATCH,
                        provider="anthropic", model="claude-3-5-haiku", served_model="claude-3-5-haiku")
        session.add(task)
        session.flush()
        add_ledger_entry(session, PriceBook(config), ResponseRecord(
            tenant_id=tenant, task_id=task.id, job_id=None, batch_id=None, task_type="classification",
            tier=Tier.LIGHT, mode=Mode.BATCH, provider="anthropic", requested_model="claude-3-5-haiku",
            served_model="claude-3-5-haiku", usage=USAGE))
    assert figures(sessions, task.id) == HAIKU_3_5_BATCH
    assert rollup_and_view(sessions, tenant) == ((1_000, Decimal("0.0005")), (1_000, Decimal("0.0005"), 7_000),
                                                 (1_000, Decimal("0.0005")))


def test_gateway_path(database: str, sessions: sessionmaker[Session], config: AppConfig) -> None:
    tenant = new_tenant(sessions)
    now = datetime.now(UTC)
    priced, cost, baseline = call_costs(PriceBook(config), "anthropic", "claude-haiku-4-5", "claude-haiku-4-5", USAGE)
    record = CallRecord(uuid.uuid4(), tenant, Route(Tier.LIGHT, RequestedTier.AUTO, "test", "classification", []),
                        {"messages": []}, {}, TaskStatus.SUCCEEDED, 1, now, now, provider="anthropic",
                        requested_model="claude-haiku-4-5", served_model="claude-haiku-4-5", output="ok",
                        usage=USAGE, latency_ms=1, prices=priced, cost_usd=cost, baseline_cost_usd=baseline)

    async def write() -> None:
        writer = CallWriter(psycopg_dsn(database), durable=True)
        try:
            await writer.write([record])
        finally:
            await writer.aclose()

    asyncio.run(write())
    assert figures(sessions, record.task_id) == HAIKU_4_5_IMMEDIATE
    assert rollup_and_view(sessions, tenant) == ((1_000, Decimal("0.00125")), (1_000, Decimal("0.00125"), 7_000),
                                                 (1_000, Decimal("0.00125")))


def test_batch_ingestion_path(sessions: sessionmaker[Session], config: AppConfig) -> None:
    tenant = new_tenant(sessions)
    with sessions.begin() as session:
        batch = ProviderBatch(id=uuid.uuid4(), provider="anthropic", model="claude-3-5-haiku",
                              status=BatchStatus.INGESTING)
        session.add(batch)
        session.flush()
        tasks = [task_row(tenant, TaskStatus.IN_BATCH, batch_id=batch.id, provider="anthropic",
                          model="claude-3-5-haiku") for _ in range(2)]
        session.add_all(tasks)
    with sessions.begin() as session:
        batch = session.get_one(ProviderBatch, batch.id)
        successes = {task.id: {"model": served, "usage": BODY_USAGE,
                               "choices": [{"message": {"role": "assistant", "content": "ok"}}]}
                     for task, served in zip(tasks, ("claude-3-5-haiku", "claude-haiku-4-5"), strict=True)}
        ingested = ingest_outcomes(session, config, PriceBook(config), batch, LineOutcomes(successes=successes))
        assert ingested.written == 2
    assert figures(sessions, tasks[0].id) == HAIKU_3_5_BATCH
    assert figures(sessions, tasks[1].id) == HAIKU_4_5_BATCH
    both = Decimal("0.0005") + Decimal("0.000625")
    assert rollup_and_view(sessions, tenant) == ((2_000, both), (2_000, both, 14_000), (2_000, both))


def test_batch_ingestion_run_twice_or_for_tasks_gone_bills_once(sessions: sessionmaker[Session],
                                                                config: AppConfig) -> None:
    tenant = new_tenant(sessions)
    with sessions.begin() as session:
        batch = ProviderBatch(id=uuid.uuid4(), provider="anthropic", model="claude-3-5-haiku",
                              status=BatchStatus.INGESTING)
        session.add(batch)
        session.flush()
        kept = task_row(tenant, TaskStatus.IN_BATCH, batch_id=batch.id, provider="anthropic", model="claude-3-5-haiku")
        # escalated to an immediate call meanwhile, and cancelled (its batch line still arrives)
        escalated = task_row(tenant, TaskStatus.RUNNING, batch_id=batch.id, provider="anthropic",
                             model="claude-3-5-haiku")
        session.add_all([kept, escalated])
    successes = {task_id: {"model": "claude-3-5-haiku", "usage": BODY_USAGE,
                           "choices": [{"message": {"role": "assistant", "content": f"answer {n}"}}]}
                 for n, task_id in enumerate((kept.id, escalated.id))}
    for expected in (1, 0):  # the second run finds nothing left to move
        with sessions.begin() as session:
            batch = session.get_one(ProviderBatch, batch.id)
            ingested = ingest_outcomes(session, config, PriceBook(config), batch, LineOutcomes(successes=successes))
            assert ingested.written == expected
    with sessions.begin() as session:
        billed = session.execute(select(LedgerEntry.task_id, func.count()).where(LedgerEntry.tenant_id == tenant)
                                 .group_by(LedgerEntry.task_id)).all()
        assert billed == [(kept.id, 1)]
        rows = {t.id: t for t in session.scalars(select(Task).where(Task.tenant_id == tenant))}
        assert (rows[kept.id].status, rows[kept.id].output) == (TaskStatus.SUCCEEDED, "answer 0")
        assert rows[kept.id].response == successes[kept.id]
        assert (rows[escalated.id].status, rows[escalated.id].output) == (TaskStatus.RUNNING, None)
    assert figures(sessions, kept.id) == HAIKU_3_5_BATCH
