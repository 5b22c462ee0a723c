"""The dashboard's pure parts: the date range it asks for (whole UTC days, so the rollup alone is read),
money as shown, autoescaping of tenant strings, and the page headers."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from starlette.datastructures import QueryParams

from tierbatch.api.dashboard.render import CONTENT_SECURITY_POLICY, ENVIRONMENT, PAGE_HEADERS, money
from tierbatch.api.dashboard.views import date_range
from tierbatch.base.errors import InvalidInput
from tierbatch.costs.query import parse_instant, plan_segments

TODAY = date(2026, 3, 15)


def test_the_default_range_is_the_last_thirty_days_with_today() -> None:
    assert date_range(QueryParams(""), TODAY) == (date(2026, 2, 14), TODAY)
    assert date_range(QueryParams("since=2026-01-01&until=2026-01-31"), TODAY) == (date(2026, 1, 1),
                                                                                   date(2026, 1, 31))


@pytest.mark.parametrize("query, param", [("since=yesterday", "since"), ("until=2026-02-30", "until"),
                                          ("since=2026-03-10&until=2026-03-01", "since")])
def test_a_bad_range_names_its_parameter(query: str, param: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        date_range(QueryParams(query), TODAY)
    assert refused.value.param == param


def test_the_range_the_pages_ask_for_is_read_from_the_daily_rollup_only() -> None:
    since, until = date_range(QueryParams(""), TODAY)
    now = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
    start = parse_instant(since.isoformat(), "since", now)
    end = parse_instant(until.isoformat(), "until", now, end=True)
    segments = plan_segments(start, end, hourly=False)
    assert [s.source for s in segments] == ["daily"]
    assert segments[0].start == datetime(2026, 2, 14, tzinfo=UTC)
    assert segments[0].end == datetime(2026, 3, 16, tzinfo=UTC)


@pytest.mark.parametrize("value, shown", [(Decimal("0.000041075"), "$0.00004108"), (Decimal("25"), "$25.00"),
                                          (Decimal("1234.5"), "$1,234.50"), (None, "—")])
def test_money_keeps_the_small_amounts_of_batch_lines(value: Decimal | None, shown: str) -> None:
    assert money(value) == shown


def test_tenant_strings_are_text_in_html_and_in_chart_data() -> None:
    template = ENVIRONMENT.from_string('<td>{{ name }}</td><script type="application/json">{{ data|tojson }}</script>')
    html = template.render(name="<script>window.__xss=1</script>", data={"labels": ["</script><script>x()"]})
    assert "<script>window" not in html and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "</script><script>x()" not in html  # the JSON block cannot be closed from inside


def test_pages_allow_scripts_from_the_dashboard_only() -> None:
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "http" not in CONTENT_SECURITY_POLICY
    assert PAGE_HEADERS["Cache-Control"] == "no-store"
