"""The dashboard's overview and costs read the daily rollup: the plan of their cost query over whole days
touches `ledger_daily` and never the ledger rows (a 10,000,000-row ledger stays out of the page)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams

from tierbatch.api.dashboard.auth import Viewer
from tierbatch.api.dashboard.views import cost_query, date_range
from tierbatch.costs.query import build_statement

pytestmark = pytest.mark.integration


@pytest.fixture
def connection(migrated_database_url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(migrated_database_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


@pytest.mark.parametrize("group_by", ["day", "mode", "task_type"])
@pytest.mark.parametrize("admin", [False, True])
def test_the_pages_cost_query_plans_on_the_rollup(connection: sa.Connection, group_by: str, admin: bool) -> None:
    tenant = uuid.uuid4()
    viewer = Viewer(None if admin else tenant, None, None, None)
    since, until = date_range(QueryParams(""))
    query = cost_query(viewer, None, {"since": [since.isoformat()], "until": [until.isoformat()],
                                      "group_by": [group_by]})
    statement = build_statement(query.group_by, query.filters, use_rollup=True, limit=query.limit)
    compiled = statement.compile(connection, compile_kwargs={"literal_binds": True})
    plan = "\n".join(row[0] for row in connection.execute(sa.text(f"EXPLAIN {compiled}")))
    assert "ledger_daily" in plan
    assert "ledger_entries" not in plan and "cost_ledger" not in plan
