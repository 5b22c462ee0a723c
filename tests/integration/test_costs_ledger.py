"""Ledger rows, the daily rollup, the views and budgets against a migrated database of this module's own.

Rows are written with `add_ledger_entry`, as the product writes them; expected figures are computed by
hand (prices) or in Python from the raw ledger rows (groupings)."""

from __future__ import annotations

import itertools
import random
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.integration.test_costs_helpers import (
    Row,
    expected_groups,
    ledger_entries,
    make_job,
    price_book,
    random_rows,
    write_rows,
)
from tests.support.stack import scratch_database
from tierbatch.api.errors import status_of
from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.errors import BudgetExceeded
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.costs.budgets import apply_budget
from tierbatch.costs.query import DIMENSIONS, CostQuery, Figures, Filters, run_cost_query
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import LedgerDaily, LedgerEntry, Task
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.tenants.store import create_tenant

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "README.md"  # its SQL examples must run as written
START = datetime(2001, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine(base_database_url: str) -> Iterator[Engine]:
    with scratch_database(base_database_url, prefix="tierbatch_costs") as url:
        upgrade_to_head(url)
        created = make_engine(url)
        try:
            yield created
        finally:
            created.dispose()


@pytest.fixture(scope="module")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture(scope="module")
def fixture_tenants(sessions: sessionmaker[Session]) -> list[uuid.UUID]:
    """Three tenants with jobs and 240 random rows over five days of March 2001."""
    rng = random.Random(20011)
    with sessions.begin() as session:
        tenants = [create_tenant(session, f"costs-{i}").id for i in range(3)]
        jobs = {t: [make_job(session, t, f"job-{i}-{j}") for j in range(2)] for i, t in enumerate(tenants)}
        write_rows(session, price_book(), random_rows(rng, tenants, jobs, START, 5, 240))
    return tenants


def new_tenant(session: Session, name: str = "t", budget: Decimal | None = None) -> uuid.UUID:
    return create_tenant(session, name, budget).id


def one_row(sessions: sessionmaker[Session], row_of: Any) -> LedgerEntry:
    with sessions.begin() as session:
        tenant = new_tenant(session)
        (task_id,) = write_rows(session, price_book(), [row_of(tenant)])
        entry = session.scalars(select(LedgerEntry).where(LedgerEntry.task_id == task_id)).one()
        task = session.get(Task, task_id)
        assert task is not None and task.cost_usd == entry.cost_usd  # a task's cost is its ledger row's
        session.expunge(entry)
        return entry


# --- rows priced by hand --------------------------------------------------------------------------------

def test_immediate_row(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.IMMEDIATE, "gpt-4o-2024-08-06", TokenUsage(10_000, 0, 2_000),
                                        requested_model="gpt-4o"))
    assert (e.input_price, e.cached_input_price, e.output_price) == (Decimal("2.5"), Decimal("1.25"), Decimal(10))
    assert (e.input_cost_usd, e.output_cost_usd, e.cost_usd) == (Decimal("0.025"), Decimal("0.02"), Decimal("0.045"))
    assert e.baseline_cost_usd == Decimal("0.045") and not e.unpriced


def test_batch_row_with_cached_tokens(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.BATCH, "gpt-4o-mini-2024-07-18", TokenUsage(2_048, 1_024, 100),
                                        requested_model="gpt-4o-mini"))
    assert (e.input_price, e.cached_input_price, e.output_price) == (
        Decimal("0.075"), Decimal("0.075"), Decimal("0.3"))
    assert e.input_cost_usd == Decimal("0.0000768") and e.cached_input_cost_usd == Decimal("0.0000768")
    assert e.output_cost_usd == Decimal("0.00003") and e.cost_usd == Decimal("0.0001836")
    # baseline: gpt-4o immediate: 1,024 × 2.50 + 1,024 × 1.25 + 100 × 10, per 1M
    assert e.baseline_cost_usd == Decimal("0.00256") + Decimal("0.00128") + Decimal("0.001")


def test_reasoning_tokens_row(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.IMMEDIATE, "o3-mini", TokenUsage(1_000, 0, 500, 300)))
    assert e.reasoning_tokens == 300 and e.output_cost_usd == Decimal("0.0022")  # 500 × 4.40 / 1M, once
    assert e.cost_usd == Decimal("0.0033")


def test_override_model_rows(sessions: sessionmaker[Session]) -> None:
    usage = TokenUsage(2_000_000, 400_000, 1_000_000)
    immediate = one_row(sessions, lambda t: Row(t, Mode.IMMEDIATE, "my-local-llama", usage))
    assert immediate.cost_usd == Decimal("0.19")  # 1.6M × 0.05 + 0.4M × 0.025 + 1M × 0.10, per 1M
    batch = one_row(sessions, lambda t: Row(t, Mode.BATCH, "my-local-llama", usage))
    assert batch.cost_usd == Decimal("0.095")


def test_cache_hit_costs_nothing_and_keeps_its_baseline(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.CACHE, "gpt-4o-mini", TokenUsage(3_000, 1_280, 400)))
    assert e.cost_usd == 0 and not e.unpriced
    assert e.baseline_cost_usd == Decimal("0.0099")
    result = query_one_tenant(sessions, e.tenant_id)
    assert result.cost_usd == 0 and result.input_cost_usd == 0 and result.output_cost_usd == 0
    assert result.savings_usd == Decimal("0.0099") and result.baseline_cost_usd == Decimal("0.0099")


def test_shadow_call_is_spend_not_savings(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.SHADOW, "gpt-4o", TokenUsage(1_000, 0, 100)))
    assert e.cost_usd == Decimal("0.0035")  # 1,000 × 2.50 + 100 × 10, per 1M: immediate price
    result = query_one_tenant(sessions, e.tenant_id)
    assert result.cost_usd == result.shadow_cost_usd == Decimal("0.0035")
    assert result.baseline_cost_usd == 0 and result.savings_usd == 0 and result.savings_pct is None


def test_unpriced_model_row(sessions: sessionmaker[Session]) -> None:
    e = one_row(sessions, lambda t: Row(t, Mode.IMMEDIATE, "mystery-model-x", TokenUsage(100, 0, 10)))
    assert e.unpriced and e.cost_usd is None and e.input_cost_usd is None and e.input_price is None
    result = query_one_tenant(sessions, e.tenant_id)
    assert (result.requests, result.unpriced_requests, result.cost_usd, result.savings_usd) == (1, 1, 0, 0)


def query_one_tenant(sessions: sessionmaker[Session], tenant: uuid.UUID) -> Figures:
    with sessions() as session:
        return run_cost_query(session, CostQuery((), Filters(tenant_id=tenant))).totals


# --- groupings: rollup = ledger rows = Python -------------------------------------------------------------

def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2001, 3, day, hour, minute, tzinfo=UTC)


RANGES = [
    (None, None), (at(2), at(4)), (at(1, 13, 17), at(4, 6, 5)), (at(2, 9), None), (None, at(3, 20)),
    (at(3, 1), at(3, 23)), (at(2, 22), at(3, 2)), (at(4), at(4)),
]


def check(session: Session, tenants: list[uuid.UUID], dims: tuple[str, ...], filters: Filters) -> None:
    everyone = session.scalars(select(LedgerEntry)).all()  # the admin's view: every tenant of this database
    entries = everyone if filters.tenant_id is None else ledger_entries(session, tenants)
    expected = expected_groups(entries, dims, filters)
    for use_rollup in (True, False):
        result = run_cost_query(session, CostQuery(dims, filters, 100_000), use_rollup=use_rollup)
        got = {tuple(r.dims[d] for d in dims): r.figures for r in result.rows}
        assert got == expected, (dims, filters, use_rollup)
        assert result.totals == sum(expected.values(), Figures())  # sums by group equal the total


def test_every_dimension_and_every_pair_with_time_filters(sessions: sessionmaker[Session],
                                                          fixture_tenants: list[uuid.UUID]) -> None:
    tenant = fixture_tenants[0]
    with sessions() as session:
        for since, until in RANGES:
            for dims in [*((d,) for d in DIMENSIONS), *itertools.combinations(DIMENSIONS, 2)]:
                if "tenant" in dims:
                    scope = Filters(since=since, until=until)  # the admin: every tenant
                else:
                    scope = Filters(since=since, until=until, tenant_id=tenant)
                check(session, fixture_tenants, dims, scope)


def test_filters(sessions: sessionmaker[Session], fixture_tenants: list[uuid.UUID]) -> None:
    with sessions() as session:
        job = session.scalar(select(LedgerEntry.job_id).where(LedgerEntry.tenant_id == fixture_tenants[1],
                                                              LedgerEntry.job_id.is_not(None)).limit(1))
        for filters in (Filters(task_type="extraction"), Filters(mode=Mode.BATCH), Filters(job_id=job),
                        Filters(since=at(1, 5), until=at(5, 19), mode=Mode.CACHE, task_type="summarization",
                                tenant_id=fixture_tenants[2])):
            check(session, fixture_tenants, ("day", "model"), filters)
            check(session, fixture_tenants, ("hour",), filters)


def test_updates_deletes_and_truncate_keep_the_rollup_in_step(sessions: sessionmaker[Session]) -> None:
    rng = random.Random(7)
    with sessions.begin() as session:
        tenants = [new_tenant(session, "churn")]
        write_rows(session, price_book(), random_rows(rng, tenants, {}, at(10), 3, 40))
    with sessions.begin() as session:
        victims = session.scalars(select(LedgerEntry.id).where(LedgerEntry.tenant_id == tenants[0])
                                  .order_by(LedgerEntry.id).limit(15)).all()
        session.execute(delete(LedgerEntry).where(LedgerEntry.id.in_(victims[:10])))
        session.execute(update(LedgerEntry).where(LedgerEntry.id.in_(victims[10:]))
                        .values(created_at=LedgerEntry.created_at + timedelta(days=1)))
    with sessions() as session:
        check(session, tenants, ("day", "mode"), Filters(tenant_id=tenants[0]))
    with sessions() as session:  # TRUNCATE is transactional: look, then roll back
        session.execute(text("TRUNCATE ledger_entries"))
        assert session.scalar(select(func.count()).select_from(LedgerDaily.__table__)) == 0
        session.rollback()
        assert (session.scalar(select(func.count()).select_from(LedgerDaily.__table__)) or 0) > 0


def test_concurrent_writers_of_one_rollup_row_lose_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        tenant = new_tenant(session, "concurrent")
    first_written = threading.Event()
    errors: list[BaseException] = []

    def writer(wait_first: bool) -> None:
        try:
            with sessions.begin() as session:
                if wait_first:
                    assert first_written.wait(10)
                write_rows(session, price_book(), [Row(tenant, Mode.BATCH, "gpt-4o-mini", TokenUsage(100, 0, 10),
                                                       at(20, 10))] * 3)
                if not wait_first:
                    first_written.set()
                    # hold the rollup row lock a little while the other writer queues behind it
                    session.execute(text("SELECT pg_sleep(0.3)"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(flag,)) for flag in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    with sessions() as session:
        daily = session.scalars(select(LedgerDaily).where(LedgerDaily.tenant_id == tenant)).all()
        assert [(d.requests, d.input_tokens) for d in daily] == [(6, 600)]


# --- views and the documented SQL ---------------------------------------------------------------------

def test_views_add_up_to_the_same_figures(sessions: sessionmaker[Session],
                                          fixture_tenants: list[uuid.UUID]) -> None:
    with sessions() as session:
        totals = run_cost_query(session, CostQuery((), Filters(since=at(1), until=at(6)))).totals
        params = {"a": at(1), "b": at(6)}
        for view, day_column in (("cost_by_day", "day"), ("cost_by_model", "day"),
                                 ("cost_by_task_type", "day"), ("cost_daily", "day")):
            row = session.execute(text(
                f"SELECT sum(requests) AS requests, sum(cost_usd) AS cost, sum(savings_usd) AS savings, "
                f"sum(unpriced_requests) AS unpriced FROM {view} "
                f"WHERE {day_column} >= CAST(:a AS date) AND {day_column} < CAST(:b AS date)"), params).one()
            assert (row.requests, row.cost, row.savings, row.unpriced) == (
                totals.requests, totals.cost_usd, totals.savings_usd, totals.unpriced_requests), view
        ledger = session.execute(text(
            "SELECT count(*), coalesce(sum(cost_usd), 0), coalesce(sum(savings_usd), 0), "
            "coalesce(sum(reasoning_cost_usd), 0) FROM cost_ledger WHERE created_at >= :a AND created_at < :b"),
            params).one()
        assert tuple(ledger) == (totals.requests, totals.cost_usd, totals.savings_usd, totals.reasoning_cost_usd)
        names = session.execute(text("SELECT DISTINCT tenant_name FROM cost_by_day WHERE day < '2001-04-01'"))
        assert {n for (n,) in names} >= {"costs-0", "costs-1", "costs-2"}


def sql_examples() -> list[str]:
    return [m.group(1) for m in re.finditer(r"```sql\n(.*?)```", DOCS.read_text(), re.DOTALL)]


def test_every_sql_example_in_the_docs_runs(sessions: sessionmaker[Session],
                                            fixture_tenants: list[uuid.UUID]) -> None:
    examples = sql_examples()
    assert len(examples) >= 10
    with sessions.begin() as session:  # some rows this month, so the examples return something
        tenant = new_tenant(session, "acme", Decimal(5))
        job = make_job(session, tenant, "nightly")
        write_rows(session, price_book(), [Row(tenant, mode, model, TokenUsage(2_000, 1_024, 300, 50), job=job)
                                           for mode, model in ((Mode.IMMEDIATE, "gpt-4o"), (Mode.BATCH, "gpt-4o-mini"),
                                                               (Mode.CACHE, "gpt-4o-mini"), (Mode.SHADOW, "gpt-4o"),
                                                               (Mode.IMMEDIATE, "mystery-model-x"))])
    returned = 0
    with sessions() as session:
        for example in examples:
            rows = session.connection().exec_driver_sql(example).all()  # as written: no bind processing
            returned += bool(rows)
    assert returned >= len(examples) - 1  # all but the invariant check (which must find nothing)


# --- budgets at task acceptance ----------------------------------------------------------------------------

def config(policy: str) -> Any:
    data = default_config_data()
    data["budget"] = {"policy": policy}
    return parse_config(data, environ={})


def task_rows(*tiers: Tier) -> list[dict[str, Any]]:
    return [{"tier": tier, "tier_reason": "explicit"} for tier in tiers]


def spend_this_month(sessions: sessionmaker[Session], budget: Decimal | None) -> tuple[uuid.UUID, Decimal]:
    with sessions.begin() as session:
        tenant = new_tenant(session, "budgeted", budget)
        write_rows(session, price_book(), [Row(tenant, Mode.IMMEDIATE, "gpt-4o", TokenUsage(10_000, 0, 2_000)),
                                           Row(tenant, Mode.BATCH, "gpt-4o-mini", TokenUsage(1_000, 0, 500)),
                                           Row(tenant, Mode.IMMEDIATE, "mystery-model-x", TokenUsage(1, 0, 1))])
    return tenant, Decimal("0.045") + Decimal("0.000225")


def set_budget(sessions: sessionmaker[Session], tenant: uuid.UUID, budget: Decimal | None) -> None:
    with sessions.begin() as session:
        session.execute(text("UPDATE tenants SET monthly_budget_usd = :b WHERE id = :t"), {"b": budget, "t": tenant})


def test_reject_policy_at_the_boundary(sessions: sessionmaker[Session]) -> None:
    tenant, spent = spend_this_month(sessions, None)
    reject = config("reject")
    with sessions() as session:
        apply_budget(session, tenant, task_rows(Tier.COMPLEX), reject)  # no budget: nothing to check
    set_budget(sessions, tenant, spent)
    with sessions() as session, pytest.raises(BudgetExceeded) as caught:
        apply_budget(session, tenant, task_rows(Tier.LIGHT), reject)
    assert status_of(caught.value) == 402
    assert "monthly budget reached: spent $0.045225 of $0.045225" in caught.value.message
    set_budget(sessions, tenant, spent + Decimal("0.0000000001"))
    with sessions() as session:
        apply_budget(session, tenant, task_rows(Tier.LIGHT), reject)  # just under: accepted
    # one unfinished task adds this month's mean cost per priced request (0.045225 / 2) to the spend
    with sessions.begin() as session:
        session.add(Task(id=uuid.uuid4(), tenant_id=tenant, task_type="general", requested_tier=RequestedTier.AUTO,
                         tier=Tier.LIGHT, tier_reason="x", urgent=False, request={"messages": []},
                         status=TaskStatus.WAITING_BATCH, attempts=0))
    with sessions() as session, pytest.raises(BudgetExceeded, match="1 unfinished task"):
        apply_budget(session, tenant, task_rows(Tier.LIGHT), reject)
    set_budget(sessions, tenant, spent + spent / 2 + Decimal("0.0000000001"))
    with sessions() as session:
        apply_budget(session, tenant, task_rows(Tier.LIGHT), reject)


def test_downgrade_policy_at_the_boundary(sessions: sessionmaker[Session]) -> None:
    tenant, spent = spend_this_month(sessions, None)
    downgrade = config("downgrade")
    set_budget(sessions, tenant, spent + Decimal("0.0000000001"))
    rows = task_rows(Tier.COMPLEX, Tier.LIGHT)
    with sessions() as session:
        apply_budget(session, tenant, rows, downgrade)
    assert [r["tier"] for r in rows] == [Tier.COMPLEX, Tier.LIGHT]
    set_budget(sessions, tenant, spent)
    with sessions() as session:
        apply_budget(session, tenant, rows, downgrade)
    assert [r["tier"] for r in rows] == [Tier.LIGHT, Tier.LIGHT]
    assert rows[0]["tier_reason"].startswith("budget: monthly budget reached")
    assert rows[0]["tier_reason"].endswith("complex downgraded to light (was: explicit)")
    assert rows[1]["tier_reason"] == "explicit"


def test_month_spend_reads_the_rollup_by_index(sessions: sessionmaker[Session], engine: Engine) -> None:
    tenant, _ = spend_this_month(sessions, Decimal(1))
    with engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(r[0] for r in connection.execute(text(
            "EXPLAIN SELECT sum(cost_usd) FROM ledger_daily WHERE tenant_id = :t "
            "AND day >= date_trunc('month', now() AT TIME ZONE 'UTC')::date"), {"t": tenant}))
        assert "uq_ledger_daily_key" in plan and "ledger_entries" not in plan
        live = "\n".join(r[0] for r in connection.execute(text(
            "EXPLAIN SELECT count(*) FROM tasks WHERE tenant_id = :t "
            "AND status IN ('queued', 'waiting_batch', 'in_batch', 'running')"), {"t": tenant}))
        assert "ix_tasks_tenant_live" in live
