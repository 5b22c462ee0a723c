"""Pure pieces of tierbatch.metrics: label values, the scrape-time families, counting after commit, the
gateway's timing middleware."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from tierbatch.api.gateway_timing import GatewayTiming
from tierbatch.base.config import ModelRef
from tierbatch.metrics.catalog import mode_label, status_class, task_type_label
from tierbatch.metrics.commit import after_commit
from tierbatch.metrics.exposition import _WithoutTenants
from tierbatch.metrics.live import Snapshot, families_of
from tierbatch.metrics.record import Billed, charge, count_billed


def test_label_values_are_bounded() -> None:
    assert [status_class(200), status_class(404), status_class(429), status_class(503)] == ["2xx", "4xx", "429", "5xx"]
    assert status_class(None) == "connection" and status_class(500, timed_out=True) == "timeout"
    assert status_class(999) == "other"
    assert task_type_label({"classification"}, "classification") == "classification"
    assert task_type_label({"classification"}, "a tenant's own words") == "other"
    assert mode_label(None) == "none"


def test_unpriced_rows_count_no_baseline_so_savings_stay_those_of_priced_rows() -> None:
    from decimal import Decimal

    assert charge("t", "batch", None, Decimal("1.5")) == Billed("t", "batch", unpriced=1)
    assert charge("t", "batch", Decimal("0.2"), Decimal("1.5")) == Billed("t", "batch", Decimal("0.2"), Decimal("1.5"))


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_counts_run_after_commit_and_never_after_rollback() -> None:
    tenant = "unit-after-commit"
    with Session() as session:  # no database: commit and rollback of an empty transaction fire the events
        session.begin()  # as any statement of the domain's would
        after_commit(session, lambda: count_billed([Billed(tenant, "batch", 0.25, 1.0)]))
        assert _value("tierbatch_spend_usd_total", tenant=tenant, mode="batch") == 0  # not before the commit
        session.commit()
        assert _value("tierbatch_spend_usd_total", tenant=tenant, mode="batch") == 0.25
        session.begin()
        after_commit(session, lambda: count_billed([Billed(tenant, "batch", 10.0, 10.0)]))
        session.rollback()
        session.commit()  # a later commit does not bring a rolled-back count back
    assert _value("tierbatch_spend_usd_total", tenant=tenant, mode="batch") == 0.25
    assert _value("tierbatch_baseline_usd_total", tenant=tenant, mode="batch") == 1.0


def _samples(snapshot: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families_of(snapshot)
            for s in family.samples}


def test_scrape_time_families_zero_what_is_idle_and_drop_what_is_unknown() -> None:
    up = _samples(Snapshot(True, [("queued", "light", "none", 3)], [("sim", "m1", 7, 12.5)],
                           [("submitted", 2, 30.0)], {("sim", "m1"): True, ("sim", "m2"): False},
                           [ModelRef(provider="sim", model="m1"), ModelRef(provider="sim", model="m2")]))
    assert up[("tierbatch_metrics_database_up", ())] == 1
    assert up[("tierbatch_tasks_live", (("mode", "none"), ("status", "queued"), ("tier", "light")))] == 3
    assert up[("tierbatch_batch_waiting_tasks", (("model", "m1"), ("provider", "sim")))] == 7
    assert up[("tierbatch_batch_waiting_tasks", (("model", "m2"), ("provider", "sim")))] == 0  # configured, idle
    assert up[("tierbatch_batch_oldest_wait_seconds", (("model", "m1"), ("provider", "sim")))] == 12.5
    assert up[("tierbatch_provider_batches_live", (("status", "submitted"),))] == 2
    assert up[("tierbatch_provider_batches_live", (("status", "ingesting"),))] == 0
    assert up[("tierbatch_model_cooling", (("model", "m1"), ("provider", "sim")))] == 1
    assert up[("tierbatch_model_cooling", (("model", "m2"), ("provider", "sim")))] == 0
    down = _samples(Snapshot(False, cooling=None))
    assert down == {("tierbatch_metrics_database_up", ()): 0}  # no stale zeros when nothing could be read


def _run_gateway(path: str, status: int, *, chunks: int = 1, fail: bool = False) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        for n in range(chunks):
            await send({"type": "http.response.body", "body": b"x", "more_body": n + 1 < chunks})
        if fail:
            raise RuntimeError("after the answer")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: dict[str, Any]) -> None:
        return None

    scope = {"type": "http", "method": "POST", "path": path}
    try:
        asyncio.run(GatewayTiming(app)(scope, receive, send))
    except RuntimeError:
        assert fail


def test_gateway_timing_observes_chat_completions_once_and_nothing_else() -> None:
    def count(status: str) -> float:
        return _value("tierbatch_gateway_request_seconds_count", status_class=status)

    ok, refused = count("2xx"), count("4xx")
    _run_gateway("/v1/chat/completions", 200, chunks=3)  # a stream: observed at its end, once
    _run_gateway("/v1/chat/completions", 400, fail=True)  # an error after the answer: still once
    _run_gateway("/v1/tasks", 200)
    assert count("2xx") == ok + 1
    assert count("4xx") == refused + 1


def test_a_scrape_without_the_admin_token_sums_the_tenant_label_away() -> None:
    source = CollectorRegistry()
    spend = Counter("demo_spend_usd", "spend", ["tenant", "mode"], registry=source)
    spend.labels("tenant-a", "batch").inc(1.25)
    spend.labels("tenant-b", "batch").inc(0.5)
    spend.labels("tenant-b", "immediate").inc(2)
    Counter("demo_calls", "calls", ["model"], registry=source).labels("m").inc(3)
    outer = CollectorRegistry(auto_describe=False)
    outer.register(_WithoutTenants(source))
    text = generate_latest(outer).decode()
    assert "tenant-a" not in text and "tenant-b" not in text
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("demo_spend_usd_total", (("mode", "batch"),))] == 1.75
    assert samples[("demo_spend_usd_total", (("mode", "immediate"),))] == 2.0
    assert samples[("demo_calls_total", (("model", "m"),))] == 3.0  # families without tenants pass as they are
