"""Tier resolution and path choice.

Tier, first that applies: the task's explicit tier → the default for its task type in config
`[routing]` → `classify_prompt`, a small heuristic that a learned router can replace later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tierbatch.base.config import AppConfig
from tierbatch.base.states import RequestedTier, Tier

# Above this many characters a prompt is treated as heavy enough for the complex model.
LONG_PROMPT_CHARS = 6_000
_REASONING_CUES = re.compile(
    r"\b(step[- ]by[- ]step|prove|proof|derive|reason(?:ing)? (?:about|through)|trade-?offs?|"
    r"design an?|architect|plan (?:a|the)|debug|refactor|why does|analy[sz]e in depth)\b",
    re.IGNORECASE,
)
_CODE_CUES = re.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|#include\b|\bfunction \w+\(")


@dataclass(frozen=True, slots=True)
class TierDecision:
    tier: Tier
    reason: str


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text content of chat messages (string contents and text parts)."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


def classify_prompt(text: str, *, tools_requested: bool = False) -> TierDecision:
    """Say light or complex from the prompt alone, with the reason."""
    if tools_requested:
        return TierDecision(Tier.COMPLEX, "auto: tools requested")
    if len(text) > LONG_PROMPT_CHARS:
        return TierDecision(Tier.COMPLEX, f"auto: long prompt ({len(text)} chars)")
    if _CODE_CUES.search(text):
        return TierDecision(Tier.COMPLEX, "auto: code in prompt")
    match = _REASONING_CUES.search(text)
    if match:
        return TierDecision(Tier.COMPLEX, f"auto: reasoning cue {match.group(0)!r}")
    return TierDecision(Tier.LIGHT, "auto: short prompt without reasoning cues")


def resolve_tier(config: AppConfig, requested: RequestedTier, task_type: str,
                 messages: Sequence[Mapping[str, Any]], *, tools_requested: bool = False) -> TierDecision:
    if requested is not RequestedTier.AUTO:
        return TierDecision(Tier(requested.value), "explicit")
    configured = config.routing.get(task_type)
    if configured is not None and configured is not RequestedTier.AUTO:
        return TierDecision(Tier(configured.value), f"config routing for {task_type!r}")
    return classify_prompt(prompt_text(messages), tools_requested=tools_requested)


def takes_batch_path(config: AppConfig, tier: Tier, urgent: bool, deadline: datetime | None,
                     now: datetime) -> bool:
    """Light and not urgent goes to a provider batch, unless the deadline is too near for it."""
    if tier is not Tier.LIGHT or urgent:
        return False
    provider = config.providers[config.tiers["light"].provider]
    if not provider.batch:
        return False
    if deadline is None:
        return True
    promise = now + timedelta(seconds=config.batch.max_wait_seconds + config.batch.expected_turnaround_seconds)
    return deadline >= promise


# the background lane's bound when the light provider's config names no `max_concurrency`
DEFAULT_LANE_CONCURRENCY = 4


def lane_provider(config: AppConfig) -> str | None:
    """The provider served by the background lane (tierbatch.tasks.lane): the light tier's primary provider
    when it has no Batch API (`batch = false`); None when non-urgent light work goes to provider batches."""
    name = config.tiers["light"].provider
    return None if config.providers[name].batch else name


def lane_bound(config: AppConfig) -> int:
    """How many background-lane calls may be in flight at once, across every worker process."""
    name = config.tiers["light"].provider
    return config.providers[name].max_concurrency or DEFAULT_LANE_CONCURRENCY


def takes_background_lane(config: AppConfig, tier: Tier, urgent: bool) -> bool:
    """Light and not urgent on a light provider without a Batch API: the bounded background lane."""
    return tier is Tier.LIGHT and not urgent and lane_provider(config) is not None
