"""The provisioned Grafana dashboards ask only for series tierbatch exports: every metric name in every
panel's `expr` is one the metrics package registers (read from the registry, not from a list here)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from tierbatch.metrics.exposition import scrape_registry
from tierbatch.metrics.live import LiveCollector

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana").glob("*.json"))
# PromQL words that look like names: functions, aggregations, keywords
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by",
                "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
                "topk", "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "le", "vector", "scalar",
                "time", "absent", "label_replace"}
# the samples each type of family exports, by suffix
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers not inside braces, a range, a string or a
    `by (…)` list, and not PromQL's own words."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, legends)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {word for word in words if word not in PROMQL_WORDS and not re.fullmatch(r"\d.*", word)}


def base_name(name: str, exported: dict[str, str]) -> str | None:
    """The family a sample name belongs to: the name without the suffix its family's type adds (`_total` of a
    counter; `_bucket`, `_count`, `_sum` of a histogram; none for a gauge), or None when no family exports it."""
    for family, kind in exported.items():
        if any(name == family + suffix for suffix in SAMPLE_SUFFIXES.get(kind, ())):
            return family
    return None


def exported_families() -> dict[str, str]:
    """Family name → type, from the registry a scrape uses and the scrape-time collector's description."""
    registry: CollectorRegistry = scrape_registry(LiveCollector())
    families = {family.name: family.type for family in registry.collect()}
    return families | {family.name: family.type for family in LiveCollector().describe()}


def test_there_is_a_dashboard_and_it_has_panels() -> None:
    assert [path.name for path in DASHBOARDS] == ["tierbatch.json"]
    board = json.loads(DASHBOARDS[0].read_text())
    assert len(list(_exprs(board))) >= 15


def test_every_panel_queries_an_exported_series() -> None:
    exported = exported_families()
    assert "tierbatch_spend_usd" in exported and "tierbatch_tasks_live" in exported
    unknown: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in _exprs(json.loads(path.read_text())):
            names = metric_names(expr)
            assert names, f"{path.name}: no metric in {expr!r}"
            missing = {name for name in names if base_name(name, exported) is None}
            if missing:
                unknown[expr] = missing
    assert not unknown, f"panels query series nobody exports: {unknown}"


def test_the_check_catches_a_made_up_metric_and_reads_promql_correctly() -> None:
    exported = exported_families()
    made_up = 'sum by (tenant) (rate(tierbatch_made_up_total{mode="batch"}[5m]))'
    assert metric_names(made_up) == {"tierbatch_made_up_total"}
    assert base_name("tierbatch_made_up_total", exported) is None
    real = ('histogram_quantile(0.95, sum by (le, provider) '
            '(rate(tierbatch_provider_call_seconds_bucket{surface="gateway"}[5m])))')
    assert metric_names(real) == {"tierbatch_provider_call_seconds_bucket"}
    assert base_name("tierbatch_provider_call_seconds_bucket", exported) == "tierbatch_provider_call_seconds"
    # a suffix counts only where the family's type has it
    assert base_name("tierbatch_tasks_finished_total", exported) == "tierbatch_tasks_finished"
    assert base_name("tierbatch_tasks_finished", exported) is None  # a counter's samples end in _total
    assert base_name("tierbatch_tasks_live", exported) == "tierbatch_tasks_live"
    assert base_name("tierbatch_tasks_live_total", exported) is None  # a gauge has no _total
    assert base_name("tierbatch_spend_usd_bucket", exported) is None
