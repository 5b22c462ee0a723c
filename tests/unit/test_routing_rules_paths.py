"""Tenant routing rules on the bulk paths, without services: a job's tier chooser and a Batch API
facade line put the tenant's rule after an explicit tier and before config `[routing]` and the
heuristic, and a rule fixes a job's tier for every item (resolved once)."""

from __future__ import annotations

import json
from typing import Any

from tierbatch.base.config import AppConfig
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.jobs.requests import JobItem, JobSettings
from tierbatch.jobs.rows import tier_chooser
from tierbatch.openai_batches.lines import parse_batch_line
from tierbatch.routing.rules import RuleView

CONFIG = AppConfig.model_validate({
    "providers": {"sim": {"base_url": "http://127.0.0.1:1/v1"}},
    "tiers": {"light": {"provider": "sim", "model": "small"}, "complex": {"provider": "sim", "model": "big"}},
    "routing": {"classification": "light"},
})
PROMOTED = {"classification": RuleView(Tier.COMPLEX, False, "quality")}
CODE = JobItem("a", "def f(x):\n    return x", None)
PLAIN = JobItem("b", "hello", None)
BUDGET = "budget: monthly budget reached"


def test_a_rule_comes_before_config_routing_and_is_resolved_once() -> None:
    choose = tier_chooser(JobSettings(task_type="classification"), CONFIG, rules=PROMOTED)
    assert choose(PLAIN) is choose(CODE)  # one decision for the whole job
    assert choose(PLAIN).tier == "complex"
    assert choose(PLAIN).reason == "routing rule for 'classification' (quality)"
    # without the rule, config routing decides, as before
    assert tier_chooser(JobSettings(task_type="classification"), CONFIG, rules={})(PLAIN).tier == "light"


def test_a_rule_comes_before_the_heuristic_and_after_an_explicit_tier() -> None:
    rules = {"general": RuleView(Tier.LIGHT, True, "api")}
    auto = tier_chooser(JobSettings(), CONFIG, rules=rules)
    assert auto(CODE).tier == "light" and auto(CODE) is auto(PLAIN)  # the heuristic would say complex
    explicit = tier_chooser(JobSettings(tier=RequestedTier.COMPLEX), CONFIG, rules=rules)
    assert (explicit(PLAIN).tier, explicit(PLAIN).reason) == ("complex", "explicit")
    other_type = tier_chooser(JobSettings(task_type="summaries"), CONFIG, rules=rules)
    assert other_type(CODE).tier == "complex" and other_type(PLAIN).tier == "light"  # per item


def test_budget_downgrade_applies_to_a_rule_too() -> None:
    choose = tier_chooser(JobSettings(task_type="classification"), CONFIG, BUDGET, PROMOTED)
    assert choose(PLAIN) is choose(CODE)
    assert choose(PLAIN).tier == "light"
    assert choose(PLAIN).reason == f"{BUDGET} (was: routing rule for 'classification' (quality))"
    demoted = {"classification": RuleView(Tier.LIGHT, False, "quality")}
    assert tier_chooser(JobSettings(task_type="classification"), CONFIG, BUDGET, demoted)(PLAIN).reason == (
        "routing rule for 'classification' (quality)")
    per_item = tier_chooser(JobSettings(), CONFIG, BUDGET, {})
    assert per_item(CODE).tier == "light" and per_item(CODE).reason.startswith(f"{BUDGET} (was: auto: ")
    assert per_item(PLAIN).reason == "auto: short prompt without reasoning cues"


def facade_line(model: str = "smart-select", **metadata: str) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "def f(x): return x"}]}
    if metadata:
        body["metadata"] = metadata
    return json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


def line_tier(raw: bytes, rules: dict[str, RuleView]) -> tuple[str, str]:
    route = parse_batch_line(1, raw, CONFIG, rules).route
    return route.tier.value, route.reason


def test_facade_lines_follow_the_rule_only_when_smart_select_is_auto() -> None:
    rules = {"classification": RuleView(Tier.LIGHT, False, "api")}
    routed = facade_line(task_type="classification")
    assert line_tier(routed, PROMOTED) == ("complex", "smart-select: routing rule for 'classification' (quality)")
    assert line_tier(routed, {}) == ("light", "smart-select: config routing for 'classification'")
    heuristic = facade_line()
    assert line_tier(heuristic, {"general": RuleView(Tier.LIGHT, False, "api")})[0] == "light"
    assert line_tier(heuristic, rules)[0] == "complex"  # no rule for `general`: code in the prompt
    explicit = facade_line(tier="light", task_type="classification")
    assert line_tier(explicit, PROMOTED) == ("light", "smart-select: explicit")
    named = facade_line(model="small", task_type="classification")
    assert line_tier(named, PROMOTED) == ("light", "model 'small' asked by name")
