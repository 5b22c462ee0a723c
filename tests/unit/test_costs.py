"""Costs without services: hand-computed prices, query parameters, time segments, SQL building, budgets."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.dialects import postgresql

from tierbatch.api.errors import status_of
from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.errors import InvalidInput
from tierbatch.cli.costs import CostsOptions, cost_table, query_params
from tierbatch.cli.jobs import CliError
from tierbatch.costs.budgets import BudgetStatus
from tierbatch.costs.query import (
    Figures,
    Filters,
    Segment,
    build_statement,
    parse_cost_query,
    parse_group_by,
    parse_instant,
    plan_segments,
)
from tierbatch.costs.report import parse_report_params
from tierbatch.ledger.pricing import PriceBook, TokenUsage

M = Decimal(1_000_000)
NOW = datetime(2026, 11, 28, 15, 30, tzinfo=UTC)


def book(**extra: object) -> PriceBook:
    data = default_config_data()
    data.update(extra)
    return PriceBook(parse_config(data, environ={}))


# --- prices, computed by hand from the published per-1M-token prices ---------------------------------
# gpt-4o: $2.50 input, $1.25 cached input, $10 output; gpt-4o-mini: $0.15, $0.075, $0.60;
# batch: half the input and output rates (OpenAI's batch table lists no cached rate: cached stays).

def test_immediate_gpt_4o() -> None:
    priced = book().price("sim", "gpt-4o-2024-08-06", "gpt-4o", TokenUsage(10_000, 0, 2_000))
    assert priced is not None
    assert priced.input_cost == Decimal("0.025")  # 10,000 × 2.50 / 1M
    assert priced.output_cost == Decimal("0.02")  # 2,000 × 10 / 1M
    assert priced.total == Decimal("0.045")


def test_cached_tokens_are_billed_once_at_the_cached_rate() -> None:
    usage = TokenUsage(input_tokens=3_000, cached_tokens=1_280, output_tokens=400)
    priced = book().price("sim", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", usage)
    assert priced is not None
    assert priced.input_cost == 1_720 * Decimal("0.15") / M == Decimal("0.000258")
    assert priced.cached_input_cost == 1_280 * Decimal("0.075") / M == Decimal("0.000096")
    assert priced.output_cost == 400 * Decimal("0.60") / M == Decimal("0.00024")
    assert priced.total == Decimal("0.000594")
    # baseline: the same tokens on gpt-4o, immediate
    assert book().baseline(usage) == Decimal("0.0043") + Decimal("0.0016") + Decimal("0.004") == Decimal("0.0099")


def test_batch_line_is_half_price() -> None:
    priced = book().price("sim", "gpt-4o-mini", "gpt-4o-mini", TokenUsage(1_000, 0, 500), batch=True)
    assert priced is not None
    assert priced.total == 1_000 * Decimal("0.075") / M + 500 * Decimal("0.30") / M == Decimal("0.000225")
    complex_batch = book().price("sim", "gpt-4o", "gpt-4o", TokenUsage(1_000, 0, 500), batch=True)
    assert complex_batch is not None and complex_batch.total == Decimal("0.00125") + Decimal("0.0025")


def test_batch_line_with_cached_tokens_never_bills_them_above_the_batch_input_rate() -> None:
    priced = book().price("sim", "gpt-4o-mini", "gpt-4o-mini", TokenUsage(2_048, 1_024, 100), batch=True)
    assert priced is not None
    assert priced.input_cost == 1_024 * Decimal("0.075") / M
    assert priced.cached_input_cost == 1_024 * Decimal("0.075") / M
    assert priced.cached_input_cost <= priced.input_cost
    assert priced.total == Decimal("0.0000768") * 2 + Decimal("0.00003")


def test_reasoning_tokens_are_output_tokens_priced_once() -> None:
    # o3-mini: $1.10 input, $0.55 cached, $4.40 output; 300 of the 500 completion tokens are reasoning
    priced = book().price("sim", "o3-mini", "o3-mini", TokenUsage(1_000, 0, 500, reasoning_tokens=300))
    assert priced is not None
    assert priced.output_cost == 500 * Decimal("4.40") / M == Decimal("0.0022")
    assert priced.total == Decimal("0.0011") + Decimal("0.0022")
    mini = book().price("sim", "gpt-4o-mini", "gpt-4o-mini", TokenUsage(1_000, 0, 500, reasoning_tokens=300))
    assert mini is not None and mini.total == Decimal("0.00015") + Decimal("0.0003")


def test_override_model_immediate_and_batch() -> None:
    prices = {"my-local-llama": {"input": 0.05, "cached_input": 0.025, "output": 0.10, "batch_discount": 0.5}}
    usage = TokenUsage(input_tokens=2_000_000, cached_tokens=400_000, output_tokens=1_000_000)
    immediate = book(prices=prices).price("sim", "my-local-llama", "my-local-llama", usage)
    assert immediate is not None
    assert immediate.total == Decimal("0.08") + Decimal("0.01") + Decimal("0.1")
    batch = book(prices=prices).price("sim", "my-local-llama", "my-local-llama", usage, batch=True)
    assert batch is not None and batch.total == Decimal("0.095")


def test_unpriced_model_has_no_cost() -> None:
    assert book().price("sim", "mystery-model-x", "mystery-model-x", TokenUsage(10, 0, 10)) is None


# --- figures ----------------------------------------------------------------------------------------

def test_savings_pct_is_measured_on_priced_non_shadow_rows() -> None:
    f = Figures(requests=3, cost_usd=Decimal("1.5"), shadow_cost_usd=Decimal("0.5"),
                baseline_cost_usd=Decimal("4"), savings_usd=Decimal("3"))
    assert f.savings_pct == Decimal("75.00")  # 3 / (3 + 1.5 − 0.5)
    assert Figures().savings_pct is None
    assert (f + f).requests == 6 and (f + f).savings_usd == Decimal("6")


# --- parameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "end", "expected"), [
    ("2026-11-01T10:00:00Z", False, datetime(2026, 11, 1, 10, tzinfo=UTC)),
    ("2026-11-01T12:00:00+02:00", False, datetime(2026, 11, 1, 10, tzinfo=UTC)),
    ("2026-11-01T10:00:00", False, datetime(2026, 11, 1, 10, tzinfo=UTC)),
    ("2026-11-01", False, datetime(2026, 11, 1, tzinfo=UTC)),
    ("2026-11-01", True, datetime(2026, 11, 2, tzinfo=UTC)),
    ("24h", False, NOW - timedelta(hours=24)),
    ("7d", False, NOW - timedelta(days=7)),
    ("30m", False, NOW - timedelta(minutes=30)),
    ("2w", False, NOW - timedelta(weeks=2)),
])
def test_instants(text: str, end: bool, expected: datetime) -> None:
    assert parse_instant(text, "since", NOW, end=end) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "7 days", "1y", "", "2026-11-01T25:00:00Z"])
def test_bad_instants_name_the_parameter(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_instant(text, "until", NOW)
    assert caught.value.param == "until" and status_of(caught.value) == 400


def test_group_by_whitelist() -> None:
    assert parse_group_by(["day,model", "tier"], admin=False) == ("day", "model", "tier")
    assert parse_group_by([""], admin=False) == ()
    for bad, admin in (("day,colour", True), ("tenant", False), ("day,day", True), ("day; drop table x", True)):
        with pytest.raises(InvalidInput) as caught:
            parse_group_by([bad], admin=admin)
        assert caught.value.param == "group_by"


def query(**params: str) -> dict[str, list[str]]:
    return {k: [v] for k, v in params.items()}


@pytest.mark.parametrize(("params", "param"), [
    (query(group_by="day,bogus"), "group_by"),
    (query(since="nope"), "since"),
    (query(until="2026-02-30"), "until"),
    (query(since="2026-11-10", until="2026-11-01"), "since"),
    (query(mode="turbo"), "mode"),
    (query(job_id="42"), "job_id"),
    (query(limit="0"), "limit"),
    (query(limit="ten"), "limit"),
    (query(groupby="day"), "groupby"),
    ({"since": ["1d", "2d"]}, "since"),
])
def test_cost_query_errors_name_the_parameter(params: dict[str, list[str]], param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_cost_query(params, tenant_scope=None, now=NOW)
    assert caught.value.param == param and status_of(caught.value) == 400


def test_tenant_scope_is_forced_and_cannot_be_chosen_by_a_tenant() -> None:
    tenant = uuid.uuid4()
    parsed = parse_cost_query(query(group_by="model", since="7d"), tenant_scope=tenant, now=NOW)
    assert parsed.filters.tenant_id == tenant and parsed.filters.since == NOW - timedelta(days=7)
    with pytest.raises(InvalidInput) as caught:
        parse_cost_query(query(tenant_id=str(uuid.uuid4())), tenant_scope=tenant, now=NOW)
    assert caught.value.param == "tenant_id"
    admin = parse_cost_query(query(tenant_id=str(tenant), group_by="tenant"), tenant_scope=None, now=NOW)
    assert admin.filters.tenant_id == tenant and admin.group_by == ("tenant",)


def test_equal_since_and_until_is_an_empty_range_not_an_error() -> None:
    parsed = parse_cost_query(query(since="2026-11-01T00:00:00Z", until="2026-11-01T00:00:00Z"),
                              tenant_scope=None, now=NOW)
    assert parsed.filters.since == parsed.filters.until


def test_report_defaults_to_the_last_seven_days() -> None:
    options = parse_report_params({}, tenant_scope=None, now=NOW)
    assert (options.since, options.until) == (NOW - timedelta(days=7), NOW)
    assert options.growth_threshold_pct == 25
    with pytest.raises(InvalidInput) as caught:
        parse_report_params(query(group_by="day"), tenant_scope=None, now=NOW)
    assert caught.value.param == "group_by"


# --- segments ---------------------------------------------------------------------------------------

def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def test_segments_read_whole_days_from_the_rollup_and_partial_days_from_the_ledger() -> None:
    assert plan_segments(None, None, hourly=False) == [Segment("daily", None, None)]
    assert plan_segments(at(1), at(10), hourly=False) == [Segment("daily", at(1), at(10))]
    assert plan_segments(at(1, 15), at(10, 6), hourly=False) == [
        Segment("ledger", at(1, 15), at(2)), Segment("daily", at(2), at(10)), Segment("ledger", at(10), at(10, 6))]
    assert plan_segments(at(1, 15), None, hourly=False) == [Segment("ledger", at(1, 15), at(2)),
                                                            Segment("daily", at(2), None)]
    assert plan_segments(None, at(3, 1), hourly=False) == [Segment("daily", None, at(3)),
                                                           Segment("ledger", at(3), at(3, 1))]
    # within one day, and across one midnight: no whole day in between
    assert plan_segments(at(1, 3), at(1, 9), hourly=False) == [Segment("ledger", at(1, 3), at(1, 9))]
    assert plan_segments(at(1, 22), at(2, 2), hourly=False) == [Segment("ledger", at(1, 22), at(2)),
                                                                Segment("ledger", at(2), at(2, 2))]
    assert plan_segments(at(1, 3), at(5), hourly=True) == [Segment("ledger", at(1, 3), at(5))]


def test_segments_use_utc_days_whatever_the_offset_given() -> None:
    paris = datetime(2026, 11, 2, 0, 30, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))
    segments = plan_segments(paris, None, hourly=False)
    assert segments[0] == Segment("ledger", paris, at(3)) and segments[1].start == at(3)


# --- SQL building: values are bound, never spliced ----------------------------------------------------

def test_filter_values_are_bound_parameters() -> None:
    hostile = "x'); DROP TABLE ledger_entries; --"
    statement = build_statement(("day", "model", "job"), Filters(since=at(1, 15), until=at(5, 3),
                                                                 task_type=hostile, tenant_id=uuid.uuid4()))
    compiled = statement.compile(dialect=postgresql.dialect())
    assert hostile not in str(compiled)
    assert hostile in compiled.params.values()
    with pytest.raises(ValueError):
        build_statement(("day; drop",), Filters())


# --- budgets ----------------------------------------------------------------------------------------

def status(budget: str, spent: str, pending: int = 0, estimate: str = "0") -> BudgetStatus:
    return BudgetStatus(Decimal(budget), date(2026, 11, 1), Decimal(spent), 10, pending, Decimal(estimate))


def test_budget_is_reached_at_exactly_the_budget() -> None:
    assert status("50", "50").reached
    assert not status("50", "49.9999999999").reached
    assert status("50", "49", pending=4, estimate="1").reached  # 49 + 1 pending = 50
    assert status("0", "0").reached  # a zero budget allows no spend
    assert "spent $50 of $50 since 2026-11-01" in status("50", "50").describe()


# --- command line -----------------------------------------------------------------------------------

def options(**changes: object) -> CostsOptions:
    base: dict[str, object] = dict(by="model,day", since="7d", until=None, task_type=None, job_id=None, mode=None,
                                   tenant_id=None, as_json=False, as_csv=False, report=False, limit=100,
                                   api_url="http://x", api_key="k")
    base.update(changes)
    return CostsOptions(**base)  # type: ignore[arg-type]


def test_cli_turns_durations_into_timestamps() -> None:
    params = query_params(options(until="2026-11-27"), now=NOW)
    assert params == {"group_by": "model,day", "limit": "100", "since": (NOW - timedelta(days=7)).isoformat(),
                      "until": "2026-11-28T00:00:00+00:00"}
    with pytest.raises(CliError, match="--by"):
        query_params(options(by="model,colour"), now=NOW)
    with pytest.raises(CliError, match="--since"):
        query_params(options(since="last week"), now=NOW)


def test_cli_table_has_a_totals_footer() -> None:
    from rich.console import Console

    row = {"day": "2026-11-27", "model": "gpt-4o-mini", "requests": 3, "input_tokens": 10, "cached_tokens": 0,
           "output_tokens": 5, "cost_usd": "0.001", "baseline_cost_usd": "0.01", "savings_usd": "0.009",
           "savings_pct": 90.0, "unpriced_requests": 0}
    body = {"group_by": ["day", "model"], "since": None, "until": None, "rows": [row], "totals": row}
    console = Console(width=200, record=True)
    console.print(cost_table(body))
    text = console.export_text()
    assert "total" in text and "gpt-4o-mini" in text and "0.0090" in text
