"""Quality loop pieces without a database: sampling, comparison, the promote/demote decision."""

from __future__ import annotations

import json
import uuid

import pytest

from tierbatch.base.config import QualityConfig, default_config_data, parse_config
from tierbatch.base.states import Tier
from tierbatch.db.models import RoutingRule
from tierbatch.quality.monitor import (
    SamplePoints,
    WindowStats,
    compare_answers,
    decide,
    may_shadow,
    sampled,
    shadow_tier_for,
)
from tierbatch.tasks.labels import label_response_format

LABELLED = {"messages": [{"role": "user", "content": "rate it"}],
            "response_format": label_response_format(["good", "bad"])}
FREE = {"messages": [{"role": "user", "content": "summarize it"}]}
Q = QualityConfig(min_samples=10, window=20, promote_below=0.9, demote_above=0.95)


def stats(agreed: int, samples: int, errors: int = 0) -> WindowStats:
    return WindowStats(samples=samples, agreed=agreed, errors=errors, window=20)


@pytest.mark.parametrize(("light", "complex_", "agreed"), [
    (json.dumps({"label": "good"}), json.dumps({"label": "good"}), True),
    (json.dumps({"label": "good"}), json.dumps({"label": "bad"}), False),
    ("good", json.dumps({"label": "good"}), True),  # a bare label is the same label
    ("not a label", "not a label", False),  # neither answer is a label: nothing agreed on
    (None, json.dumps({"label": "good"}), False),
])
def test_labels_compare_exactly(light: str | None, complex_: str | None, agreed: bool) -> None:
    assert compare_answers(LABELLED, light, complex_, 0.85).agreed is agreed


def test_free_text_compares_by_similarity_against_the_threshold() -> None:
    same = compare_answers(FREE, "The parcel came late.", "The parcel came late.", 0.85)
    close = compare_answers(FREE, "The parcel came late.", "The parcel came late!", 0.85)
    far = compare_answers(FREE, "The parcel came late.", "Billing is up to date for this account.", 0.85)
    assert (same.agreed, same.score) == (True, 1.0)
    assert close.agreed and 0.85 <= close.score < 1
    assert not far.agreed and far.score < 0.85
    assert compare_answers(FREE, "The parcel came late.", "The parcel came late!", 0.99).agreed is False


@pytest.mark.parametrize(("point", "rate", "expected"), [
    (0.0, 0.0, False), (0.999, 1.0, True), (1.0, 1.0, True),  # rates 0 and 1 take none and all
    (0.049, 0.05, True), (0.05, 0.05, False), (0.5, 0.3, False),
])
def test_a_draw_is_in_the_sample_below_the_rate(point: float, rate: float, expected: bool) -> None:
    # where each task's draw comes from (its request's hash) is tests/integration/test_quality_sampling.py
    assert sampled(point, rate) is expected


@pytest.mark.parametrize(("tier", "window", "expected"), [
    (Tier.LIGHT, stats(7, 10), "promote"),  # 70% with min_samples
    (Tier.LIGHT, stats(6, 9), None),  # too few samples, however bad
    (Tier.LIGHT, stats(0, 0, errors=50), None),  # provider errors are not samples
    (Tier.LIGHT, stats(9, 10), None),  # 90% is not below 90%
    (Tier.LIGHT, stats(19, 20), None),
    (Tier.COMPLEX, stats(10, 10), "demote"),  # probes agree fully
    (Tier.COMPLEX, stats(19, 20), None),  # 95% is not above 95%: hysteresis
    (Tier.COMPLEX, stats(7, 10), None),
    (Tier.COMPLEX, stats(9, 9), None),
])
def test_decide(tier: Tier, window: WindowStats, expected: str | None) -> None:
    assert decide(Q, tier, window) == expected


def test_figures_name_the_thresholds() -> None:
    figures = stats(7, 10, errors=3).figures(Q)
    assert figures == {"agreement": 0.7, "samples": 10, "agreed": 7, "provider_errors": 3, "window": 20,
                       "min_samples": 10, "promote_below": 0.9, "demote_above": 0.95}


def _rule(tier: Tier, source: str, pinned: bool = False) -> RoutingRule:
    return RoutingRule(tenant_id=uuid.uuid4(), task_type="t", tier=tier, pinned=pinned, source=source)


def test_shadow_direction() -> None:
    data = default_config_data()
    data["quality"] = {"shadow_rate": 1.0, "probe_rate": 1.0}
    config = parse_config(data)
    task = SamplePoints(shadow=0.5, probe=0.5)
    assert shadow_tier_for(config, Tier.LIGHT, None, task) is Tier.COMPLEX
    assert shadow_tier_for(config, Tier.LIGHT, _rule(Tier.LIGHT, "api", pinned=True), task) is Tier.COMPLEX
    assert shadow_tier_for(config, Tier.COMPLEX, None, task) is None  # complex by config: no probes
    assert shadow_tier_for(config, Tier.COMPLEX, _rule(Tier.COMPLEX, "api"), task) is None
    assert shadow_tier_for(config, Tier.COMPLEX, _rule(Tier.COMPLEX, "quality"), task) is Tier.LIGHT
    assert shadow_tier_for(config, Tier.COMPLEX, _rule(Tier.COMPLEX, "quality", pinned=True), task) is None
    data["quality"] = {"shadow_rate": 0.0, "probe_rate": 0.0}
    quiet = parse_config(data)
    assert shadow_tier_for(quiet, Tier.LIGHT, None, task) is None
    assert shadow_tier_for(quiet, Tier.COMPLEX, _rule(Tier.COMPLEX, "quality"), task) is None
    # each direction reads its own draw
    data["quality"] = {"shadow_rate": 0.3, "probe_rate": 0.3}
    some = parse_config(data)
    probe_only = SamplePoints(shadow=0.6, probe=0.1)
    assert shadow_tier_for(some, Tier.LIGHT, None, probe_only) is None
    assert shadow_tier_for(some, Tier.COMPLEX, _rule(Tier.COMPLEX, "quality"), probe_only) is Tier.LIGHT
    assert shadow_tier_for(some, Tier.LIGHT, None, SamplePoints(shadow=0.1, probe=0.6)) is Tier.COMPLEX


def test_similarity_threshold_is_configurable() -> None:
    data = default_config_data()
    data["quality"] = {"similarity_threshold": 0.7}
    assert parse_config(data).quality.similarity_threshold == 0.7


def test_cli_report_renders_rows_moves_and_latency() -> None:
    from rich.console import Console

    from tierbatch.cli.quality import render

    event = {"task_type": "shaky", "action": "promote", "actor": "quality", "from_tier": None,
             "to_tier": "complex", "pinned": False, "reason": "agreement 70.0% over 10 comparisons is below 90%",
             "figures": {}, "at": "2026-11-28T03:00:00+00:00"}
    report = {"data": [{"task_type": "shaky", "tier": "complex", "pinned": False, "agreement": 0.7, "samples": 10,
                        "min_samples": 10, "window": 20, "provider_errors": 1, "shadow_cost_usd": "0.0012",
                        "events": [event]}],
              "latency": [{"model": "gpt-4o", "mode": "shadow", "calls": 10, "p50_ms": 12.0, "p95_ms": 20.5}],
              "batch_turnaround": {"tasks": 0, "p50_seconds": None, "p95_seconds": None}}
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "shaky" in text and "70.0%" in text and "promote" in text and "gpt-4o" in text and "0.0012" in text


def test_a_tier_whose_rate_is_zero_is_never_shadowed_so_its_rule_need_not_be_read() -> None:
    data = default_config_data()
    rules = [None, _rule(Tier.LIGHT, "api"), _rule(Tier.COMPLEX, "quality"), _rule(Tier.COMPLEX, "quality", True)]
    points = [SamplePoints(shadow=p, probe=p) for p in (0.0, 0.3, 0.999)]
    for shadow_rate, probe_rate in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5)):
        data["quality"] = {"shadow_rate": shadow_rate, "probe_rate": probe_rate}
        config = parse_config(data)
        assert may_shadow(config, Tier.LIGHT) is (shadow_rate > 0)
        assert may_shadow(config, Tier.COMPLEX) is (probe_rate > 0)
        for tier in Tier:
            if not may_shadow(config, tier):
                assert all(shadow_tier_for(config, tier, rule, point) is None for rule in rules for point in points)
    data["quality"] = {"shadow_rate": 1.0, "probe_rate": 1.0}
    assert shadow_tier_for(parse_config(data), Tier.COMPLEX, rules[2], points[0]) is Tier.LIGHT  # the loop can fail
