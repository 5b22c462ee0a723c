"""`GET /v1/costs`, the token report, budgets and real tasks' costs, against the running stack.

Fixture rows are written straight into the stack's database through `add_ledger_entry`, dated 2001 so
that nothing else in the run falls into their time range; budget tests use rows of the current month
for tenants of their own."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from tests.integration.test_costs_helpers import (
    Row,
    expected_groups,
    figures_from_body,
    ledger_entries,
    make_job,
    price_book,
    random_rows,
    write_rows,
)
from tests.support.procs import ManagedProcess, free_port, python_module, wait_http_ok, wait_until
from tests.support.stack import Stack, write_app_config
from tierbatch.base.states import Mode
from tierbatch.costs.query import DIMENSIONS, Figures, Filters
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import LedgerEntry
from tierbatch.ledger.pricing import TokenUsage

pytestmark = pytest.mark.integration

START = datetime(2001, 6, 1, tzinfo=UTC)
SINCE, UNTIL = "2001-06-01T07:45:00Z", "2001-06-04T18:10:00+02:00"
M = Decimal(1_000_000)


@dataclass
class Tenant:
    id: uuid.UUID
    key: str


def new_tenant(stack: Stack, name: str, budget: str | None = None) -> Tenant:
    with stack.admin_client() as admin:
        body: dict[str, Any] = {"name": name}
        if budget is not None:
            body["monthly_budget_usd"] = budget
        response = admin.post("/v1/admin/tenants", json=body)
        assert response.status_code == 201, response.text
    tenant = Tenant(uuid.UUID(response.json()["id"]), response.json()["api_key"])
    # the admin route's session commits just after its answer is sent: wait until the tenant is there
    wait_until(lambda: get(stack, tenant.key, "/v1/costs/budget").status_code == 200, 10, 0.02, "tenant visible")
    return tenant


@pytest.fixture(scope="module")
def db(stack: Stack) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(stack.database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def two_tenants(stack: Stack, db: sessionmaker[Session]) -> tuple[Tenant, Tenant]:
    a, b = new_tenant(stack, "costs-a"), new_tenant(stack, "costs-b")
    rng = random.Random(4242)
    with db.begin() as session:
        jobs = {t.id: [make_job(session, t.id, f"job-{n}") for n in range(2)] for t in (a, b)}
        write_rows(session, price_book(), random_rows(rng, [a.id, b.id], jobs, START, 5, 200))
    return a, b


def get(stack: Stack, key: str, path: str = "/v1/costs", **params: str) -> httpx.Response:
    with stack.client(key) as client:
        return client.get(path, params=params)


def as_groups(body: dict[str, Any], dims: tuple[str, ...]) -> dict[tuple[Any, ...], Figures]:
    keys = {"job": "job_id", "tenant": "tenant_id"}
    return {tuple(row[keys.get(d, d)] for d in dims): figures_from_body(row) for row in body["rows"]}


def entries(db: sessionmaker[Session], *tenants: uuid.UUID) -> list[LedgerEntry]:
    with db() as session:
        found = ledger_entries(session, list(tenants))
        session.expunge_all()
        return found


def test_grouped_by_each_dimension_and_by_pairs_with_time_filters(stack: Stack, db: sessionmaker[Session],
                                                                  two_tenants: tuple[Tenant, Tenant]) -> None:
    a, b = two_tenants
    rows = entries(db, a.id, b.id)
    since = datetime.fromisoformat(SINCE)
    until = datetime.fromisoformat(UNTIL)
    dimension_sets = [*((d,) for d in DIMENSIONS if d != "tenant"),
                      *itertools.combinations([d for d in DIMENSIONS if d != "tenant"], 2)]
    for dims in dimension_sets:
        for params, filters in (({"since": SINCE, "until": UNTIL}, Filters(since=since, until=until)),
                                ({"since": "2001-06-02", "until": "2001-06-03"},
                                 Filters(since=START + timedelta(days=1), until=START + timedelta(days=3)))):
            response = get(stack, a.key, group_by=",".join(dims), **params)
            assert response.status_code == 200, response.text
            body = response.json()
            expected = expected_groups(rows, dims, Filters(since=filters.since, until=filters.until, tenant_id=a.id))
            assert as_groups(body, dims) == expected, dims
            assert figures_from_body(body["totals"]) == sum(expected.values(), Figures())
            assert all(isinstance(row["cost_usd"], str) for row in body["rows"])


def test_a_tenant_never_sees_another_tenants_rows(stack: Stack, db: sessionmaker[Session],
                                                  two_tenants: tuple[Tenant, Tenant]) -> None:
    a, b = two_tenants
    rows = entries(db, a.id, b.id)
    for tenant in (a, b):
        body = get(stack, tenant.key, since="2001-01-01", until="2001-12-31").json()
        expected = expected_groups(rows, (), Filters(tenant_id=tenant.id))
        assert figures_from_body(body["totals"]) == expected[()]
    b_job = next(r.job_id for r in rows if r.tenant_id == b.id and r.job_id is not None)
    body = get(stack, a.key, job_id=str(b_job)).json()
    assert body["rows"] == [] and body["totals"]["requests"] == 0
    for params, param in (({"group_by": "tenant"}, "group_by"), ({"tenant_id": str(b.id)}, "tenant_id")):
        response = get(stack, a.key, **params)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_admin_sees_every_tenant(stack: Stack, db: sessionmaker[Session],
                                     two_tenants: tuple[Tenant, Tenant]) -> None:
    a, b = two_tenants
    rows = entries(db, a.id, b.id)
    with stack.admin_client() as admin:
        body = admin.get("/v1/costs", params={"group_by": "tenant,mode", "since": SINCE, "until": UNTIL}).json()
        only_b = admin.get("/v1/costs", params={"tenant_id": str(b.id), "group_by": "model"}).json()
    filters = Filters(since=datetime.fromisoformat(SINCE), until=datetime.fromisoformat(UNTIL))
    assert as_groups(body, ("tenant", "mode")) == expected_groups(rows, ("tenant", "mode"), filters)
    assert {row["tenant_name"] for row in body["rows"]} == {"costs-a", "costs-b"}
    assert as_groups(only_b, ("model",)) == expected_groups(rows, ("model",), Filters(tenant_id=b.id))


@pytest.mark.parametrize(("params", "param"), [
    ({"group_by": "day,colour"}, "group_by"),
    ({"since": "last tuesday"}, "since"),
    ({"until": "2001-02-30"}, "until"),
    ({"since": "2001-06-05", "until": "2001-06-01"}, "since"),
    ({"mode": "turbo"}, "mode"),
    ({"job_id": "not-an-id"}, "job_id"),
    ({"limit": "0"}, "limit"),
    ({"sort": "cost"}, "sort"),
    ({"group_by": "model'); DROP TABLE ledger_entries; --"}, "group_by"),
])
def test_invalid_parameters_are_400_naming_the_parameter(stack: Stack, two_tenants: tuple[Tenant, Tenant],
                                                         params: dict[str, str], param: str) -> None:
    response = get(stack, two_tenants[0].key, **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_unauthenticated_is_401(stack: Stack) -> None:
    assert get(stack, "tb_wrong").status_code == 401
    assert httpx.get(f"{stack.api_url}/v1/costs").status_code == 401


def test_token_report_flags_verbose_task_types(stack: Stack, db: sessionmaker[Session]) -> None:
    tenant = new_tenant(stack, "verbose")
    week = datetime(2001, 9, 10, tzinfo=UTC)
    rows = []
    for day in range(7):
        for n in range(3):
            before, now = week - timedelta(days=7 - day, hours=-n), week + timedelta(days=day, hours=n)
            rows += [Row(tenant.id, Mode.IMMEDIATE, "gpt-4o-mini", TokenUsage(1_000, 500, 100), before,
                         "summarization"),
                     Row(tenant.id, Mode.BATCH, "gpt-4o-mini", TokenUsage(1_000, 500, 200), now, "summarization"),
                     Row(tenant.id, Mode.IMMEDIATE, "gpt-4o-mini", TokenUsage(2_000, 0, 50), before, "classification"),
                     Row(tenant.id, Mode.IMMEDIATE, "gpt-4o-mini", TokenUsage(2_000, 0, 55), now, "classification")]
    with db.begin() as session:
        write_rows(session, price_book(), rows)
    response = get(stack, tenant.key, "/v1/costs/report", since="2001-09-10", until="2001-09-16")
    assert response.status_code == 200, response.text
    report = {row["task_type"]: row for row in response.json()["task_types"]}
    summary, labels = report["summarization"], report["classification"]
    assert (summary["output_tokens_per_request"], summary["previous_output_tokens_per_request"]) == (200.0, 100.0)
    assert summary["output_tokens_growth_pct"] == 100.0 and summary["verbose"] is True
    assert labels["output_tokens_growth_pct"] == 10.0 and labels["verbose"] is False
    assert summary["cached_token_share_pct"] == 50.0 and labels["cached_token_share_pct"] == 0.0
    # 21 batch lines: 500 × 0.075 + 500 × 0.075 input side, 200 × 0.30 output, per 1M, each
    assert Decimal(summary["input_side_cost_usd"]) == 21 * (500 * Decimal("0.075") * 2) / M
    assert Decimal(summary["output_cost_usd"]) == 21 * 200 * Decimal("0.30") / M
    assert summary["output_cost_share_pct"] == 44.44
    # growth is only flagged with enough calls in both periods
    strict = get(stack, tenant.key, "/v1/costs/report", since="2001-09-10", until="2001-09-16",
                 min_requests="50").json()
    assert not any(row["verbose"] for row in strict["task_types"])


# --- real tasks ---------------------------------------------------------------------------------------

PUBLISHED = {  # USD per 1M tokens: input, cached input, output
    ("gpt-4o", "immediate"): (Decimal("2.50"), Decimal("1.25"), Decimal("10")),
    ("gpt-4o-mini", "immediate"): (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    ("gpt-4o-mini", "batch"): (Decimal("0.075"), Decimal("0.075"), Decimal("0.30")),
}


def by_hand(model: str, mode: str, usage: dict[str, int]) -> Decimal:
    family = "gpt-4o-mini" if model.startswith("gpt-4o-mini") else "gpt-4o"
    price_in, price_cached, price_out = PUBLISHED[(family, mode)]
    uncached = usage["input_tokens"] - usage["cached_tokens"]
    return (uncached * price_in + usage["cached_tokens"] * price_cached + usage["output_tokens"] * price_out) / M


def test_real_tasks_cost_what_the_published_prices_say(sim_reset: Stack, db: sessionmaker[Session]) -> None:
    stack = sim_reset
    tenant = new_tenant(stack, "real")
    with stack.client(tenant.key) as client:
        submitted = client.post("/v1/tasks", json={"tasks": [
            {"prompt": "Plan a database migration step by step.", "tier": "complex"},
            {"prompt": "Say hi", "tier": "light", "urgent": True},
            {"prompt": "Classify: refund please. Labels: billing, bug", "tier": "light",
             "task_type": "classification"},
        ]})
        assert submitted.status_code == 202, submitted.text
        tasks = [stack.wait_for_task(client, t["id"], {"succeeded", "failed"}, timeout=60)
                 for t in submitted.json()["data"]]
    assert [(t["status"], t["mode"]) for t in tasks] == [
        ("succeeded", "immediate"), ("succeeded", "immediate"), ("succeeded", "batch")]
    total = Decimal(0)
    with db() as session:
        for task in tasks:
            cost = Decimal(task["cost_usd"])
            assert cost == by_hand(task["served_model"], task["mode"], task["usage"]), task
            ledger = session.scalars(select(LedgerEntry.cost_usd).where(LedgerEntry.task_id == task["id"])).all()
            assert sum((c or Decimal(0) for c in ledger), Decimal(0)) == cost  # the task's cost: its rows' sum
            total += cost
    body = get(stack, tenant.key, group_by="mode").json()
    assert Decimal(body["totals"]["cost_usd"]) == total
    assert {row["mode"]: row["requests"] for row in body["rows"]} == {"batch": 1, "immediate": 2}


# --- budgets --------------------------------------------------------------------------------------------

def spend(db: sessionmaker[Session], tenant: uuid.UUID) -> Decimal:
    """Rows of the current month costing 0.045 + 0.000225 USD (hand-computed)."""
    with db.begin() as session:
        write_rows(session, price_book(), [Row(tenant, Mode.IMMEDIATE, "gpt-4o", TokenUsage(10_000, 0, 2_000)),
                                           Row(tenant, Mode.BATCH, "gpt-4o-mini", TokenUsage(1_000, 0, 500))])
    return Decimal("0.045225")


def set_budget(stack: Stack, tenant: Tenant, budget: Decimal | None) -> None:
    with stack.admin_client() as admin:
        response = admin.patch(f"/v1/admin/tenants/{tenant.id}",
                               json={"monthly_budget_usd": None if budget is None else str(budget)})
        assert response.status_code == 200, response.text


EPSILON = Decimal("0.0000000001")
COMPLEX_TASK = {"prompt": "Prove that the algorithm terminates, step by step.", "tier": "complex", "urgent": True}


def test_reject_policy_answers_402_from_exactly_the_budget(stack: Stack, db: sessionmaker[Session]) -> None:
    tenant = new_tenant(stack, "reject", budget="100")
    spent = spend(db, tenant.id)
    set_budget(stack, tenant, spent)
    with stack.client(tenant.key) as client:
        refused = client.post("/v1/tasks", json=COMPLEX_TASK)
        assert refused.status_code == 402, refused.text
        error = refused.json()["error"]
        assert error["type"] == "budget_exceeded"
        assert error["message"].startswith("monthly budget reached: spent $0.045225 of $0.045225 since ")
        status = client.get("/v1/costs/budget").json()
        assert status["reached"] is True and status["spent_usd"] == "0.045225" and status["remaining_usd"] == "0"
    set_budget(stack, tenant, spent + EPSILON)
    with stack.client(tenant.key) as client:
        accepted = client.post("/v1/tasks", json=COMPLEX_TASK)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["tier"] == "complex"
    set_budget(stack, tenant, None)


@pytest.fixture
def downgrade_api(sim_reset: Stack) -> Iterator[str]:
    """A second API process whose config says `[budget] policy = "downgrade"`; same database, broker
    key space and simulator as the stack, so the stack's worker serves its tasks."""
    stack = sim_reset
    config = write_app_config(stack.tmp / "downgrade.toml", stack.simulator_port, '[budget]\npolicy = "downgrade"\n')
    port = free_port()
    proc = ManagedProcess(python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port)),
                          env={**stack.env, "TIERBATCH_CONFIG": str(config)}, log_path=stack.tmp / "api-downgrade.log")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_downgrade_policy_serves_complex_as_light_from_exactly_the_budget(
        sim_reset: Stack, downgrade_api: str, db: sessionmaker[Session]) -> None:
    stack = sim_reset
    tenant = new_tenant(stack, "downgrade")
    spent = spend(db, tenant.id)
    with httpx.Client(base_url=downgrade_api, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30) as c:
        set_budget(stack, tenant, spent + EPSILON)
        under = c.post("/v1/tasks", json=COMPLEX_TASK)
        assert under.status_code == 202 and under.json()["tier"] == "complex", under.text
        done = stack.wait_for_task(c, under.json()["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded" and done["model"] == "gpt-4o"
        assert done["tier_reason"] == "explicit"

        set_budget(stack, tenant, spent)  # the call above added spend too: far past the budget now
        over = c.post("/v1/tasks", json=COMPLEX_TASK)
        assert over.status_code == 202, over.text
        assert over.json()["tier"] == "light"
        task = stack.wait_for_task(c, over.json()["id"], {"succeeded", "failed"})
        assert task["status"] == "succeeded" and task["tier"] == "light" and task["model"] == "gpt-4o-mini"
        assert task["tier_reason"].startswith("budget: monthly budget reached (spent $")
        assert task["tier_reason"].endswith("complex downgraded to light (was: explicit)")
        assert c.get("/v1/costs/budget").json()["policy"] == "downgrade"


def test_month_spend_counts_only_this_month(stack: Stack, db: sessionmaker[Session]) -> None:
    tenant = new_tenant(stack, "months", budget="1")
    with db.begin() as session:
        write_rows(session, price_book(), [Row(tenant.id, Mode.IMMEDIATE, "gpt-4o", TokenUsage(10_000, 0, 2_000),
                                               datetime.now(UTC) - timedelta(days=40))])
    status = get(stack, tenant.key, "/v1/costs/budget").json()
    assert status["spent_usd"] == "0" and status["reached"] is False
    spend(db, tenant.id)
    status = get(stack, tenant.key, "/v1/costs/budget").json()
    assert status["spent_usd"] == "0.045225" and status["remaining_usd"] == "0.954775"


# --- command line ---------------------------------------------------------------------------------------

def run_cli(stack: Stack, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env, "TIERBATCH_API_URL": stack.api_url, "COLUMNS": "250"}
    env.pop("TIERBATCH_API_KEY", None)
    if key is not None:
        env["TIERBATCH_API_KEY"] = key
    return subprocess.run(python_module("tierbatch.cli", "costs", *args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_prints_a_table_json_and_csv(stack: Stack, db: sessionmaker[Session],
                                         two_tenants: tuple[Tenant, Tenant]) -> None:
    a, b = two_tenants
    expected = expected_groups(entries(db, a.id, b.id), (), Filters(
        tenant_id=a.id, since=datetime.fromisoformat(SINCE), until=datetime.fromisoformat(UNTIL)))[()]
    table = run_cli(stack, "--by", "model,day", "--since", SINCE, "--until", UNTIL, key=a.key)
    assert table.returncode == 0, table.stderr
    assert "costs by model, day" in table.stdout and "total" in table.stdout
    assert f"{expected.requests:,}" in table.stdout
    as_json = json.loads(run_cli(stack, "--by", "mode", "--since", SINCE, "--until", UNTIL, "--json",
                                 key=a.key).stdout)
    assert figures_from_body(as_json["totals"]) == expected
    as_csv = list(csv.DictReader(io.StringIO(run_cli(stack, "--by", "task_type", "--since", SINCE, "--until", UNTIL,
                                                     "--csv", key=a.key).stdout)))
    assert sum(int(row["requests"]) for row in as_csv) == expected.requests
    # without a tenant key the admin token is used: every tenant
    admin = json.loads(run_cli(stack, "--by", "tenant", "--since", SINCE, "--until", UNTIL, "--json").stdout)
    assert {row["tenant_name"] for row in admin["rows"]} == {"costs-a", "costs-b"}
    report = run_cli(stack, "--report", "--since", "2001-06-02", "--until", "2001-06-04", key=a.key)
    assert report.returncode == 0 and "classification" in report.stdout, report.stderr
    bad = run_cli(stack, "--by", "colour", key=a.key)
    assert bad.returncode == 2 and "--by" in bad.stderr
    refused = run_cli(stack, "--by", "tenant", key=a.key)
    assert refused.returncode == 2 and "admin token" in refused.stderr
