"""Shadow comparisons and automatic promotion / demotion.

- Sampling: a Light task is shadowed on the complex model with probability `shadow_rate`; a task type the
  quality loop promoted to complex is probed the other way (its complex tasks also run on the light
  model) at `probe_rate`. The decision is a stable hash of the task's stored request (Postgres's
  `jsonb_hash_extended`, one seed for shadows, another for probes): a redelivered message decides the
  same way, and so does the same workload submitted again, whatever ids its tasks get, so a benchmark
  run twice shadows the same tasks. Identical requests are sampled together (the response cache
  answers most of them anyway).
- Comparison: labelled requests compare labels exactly; free text by rapidfuzz's ratio against
  `similarity_threshold`. A failed shadow call is recorded with `agreed = NULL` and never counts.
- Window: the last `window` counted comparisons of a tenant's task type since its rule last changed
  (fresh evidence for every verdict). With `min_samples` or more, agreement below `promote_below`
  promotes a light task type to complex; agreement above `demote_above` demotes a promoted one back.
  Only comparisons in the current direction count (shadows while light, probes while promoted).
  A pinned rule never moves (its Light tasks are still shadowed, so the report shows its agreement).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from rapidfuzz import fuzz
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig, QualityConfig
from tierbatch.base.states import Tier
from tierbatch.db.models import QualityComparison, RoutingEvent, RoutingRule
from tierbatch.routing.rules import config_tier, lock_task_type, seed_rules, set_rule
from tierbatch.tasks.labels import extract_label, labels_of
from tierbatch.tasks.sample_points import PROBE_SEED, SHADOW_SEED, point_sql

QUALITY_ACTOR = "quality"


# the ids go as one array literal: far cheaper than adapting thousands of UUIDs one by one
_POINTS = text(f"SELECT id, {point_sql(SHADOW_SEED)}, {point_sql(PROBE_SEED)} FROM tasks "
               "WHERE id = ANY(CAST(:ids AS uuid[]))")


@dataclass(frozen=True, slots=True)
class SamplePoints:
    """A task's two draws, each in [0, 1)."""

    shadow: float
    probe: float


def sampled(point: float, rate: float) -> bool:
    """Whether a draw at `point` is in the `rate` share."""
    if rate <= 0:
        return False
    return rate >= 1 or point < rate


def _id_array(task_ids: Collection[uuid.UUID]) -> str:
    return "{" + ",".join(str(task_id) for task_id in task_ids) + "}"


def sample_points(session: Session, task_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, SamplePoints]:
    """The draws of these tasks (tasks not found are left out)."""
    if not task_ids:
        return {}
    rows = session.execute(_POINTS, {"ids": _id_array(task_ids)})
    return {task_id: SamplePoints(float(shadow), float(probe)) for task_id, shadow, probe in rows}


def may_shadow(config: AppConfig, tier: Tier) -> bool:
    """Whether any task served on `tier` can get an extra call at the configured rates: when not, the
    caller need not read the task's rule and sample points (`shadow_tier_for` would say None)."""
    quality = config.quality
    return (quality.shadow_rate if tier is Tier.LIGHT else quality.probe_rate) > 0


def shadow_tier_for(config: AppConfig, tier: Tier, rule: RoutingRule | None, points: SamplePoints) -> Tier | None:
    """The tier of the extra call to make for a task served on `tier`, or None for no extra call."""
    quality = config.quality
    if tier is Tier.LIGHT:  # pinned ones too: the report shows their agreement, the rule stays put
        return Tier.COMPLEX if sampled(points.shadow, quality.shadow_rate) else None
    promoted = (rule is not None and rule.source == QUALITY_ACTOR and rule.tier is Tier.COMPLEX
                and not rule.pinned)
    return Tier.LIGHT if promoted and sampled(points.probe, quality.probe_rate) else None


@dataclass(frozen=True, slots=True)
class Verdict:
    agreed: bool
    score: float


def compare_answers(request: Mapping[str, Any], light: str | None, complex_: str | None,
                    threshold: float) -> Verdict:
    """Labels exactly (an answer that is not a label disagrees); free text by similarity."""
    labels = labels_of(request)
    if labels is not None:
        light_label, complex_label = extract_label(light, labels), extract_label(complex_, labels)
        agreed = light_label is not None and light_label == complex_label
        return Verdict(agreed, 1.0 if agreed else 0.0)
    score = fuzz.ratio((light or "").strip(), (complex_ or "").strip()) / 100.0
    return Verdict(score >= threshold, round(score, 4))


@dataclass(frozen=True, slots=True)
class WindowStats:
    samples: int  # counted comparisons (provider errors excluded)
    agreed: int
    errors: int  # shadow calls that failed, over the same period (not counted)
    window: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.samples if self.samples else None

    def figures(self, quality: QualityConfig) -> dict[str, Any]:
        return {"agreement": round(self.agreement, 4) if self.agreement is not None else None,
                "samples": self.samples, "agreed": self.agreed, "provider_errors": self.errors,
                "window": self.window, "min_samples": quality.min_samples,
                "promote_below": quality.promote_below, "demote_above": quality.demote_above}


def window_stats(session: Session, tenant_id: uuid.UUID, task_type: str, window: int,
                 tier: Tier | None = None) -> WindowStats:
    """Agreement over the last `window` counted comparisons since the task type's rule last changed;
    with `tier`, only comparisons made in that tier's direction (shadows of light, probes of complex)."""
    since = session.scalar(select(RoutingEvent.created_at).where(
        RoutingEvent.tenant_id == tenant_id, RoutingEvent.task_type == task_type,
    ).order_by(RoutingEvent.created_at.desc(), RoutingEvent.id.desc()).limit(1))
    scope = [QualityComparison.tenant_id == tenant_id, QualityComparison.task_type == task_type]
    if since is not None:
        scope.append(QualityComparison.created_at > since)
    if tier is not None:
        scope.append(QualityComparison.shadow_tier == (Tier.COMPLEX if tier is Tier.LIGHT else Tier.LIGHT))
    recent = (select(QualityComparison.agreed).where(*scope, QualityComparison.agreed.is_not(None))
              .order_by(QualityComparison.created_at.desc(), QualityComparison.id.desc()).limit(window).subquery())
    samples, agreed = session.execute(
        select(func.count(), func.count().filter(recent.c.agreed.is_(True))).select_from(recent)).one()
    errors = session.scalar(select(func.count()).select_from(QualityComparison)
                            .where(*scope, QualityComparison.agreed.is_(None))) or 0
    return WindowStats(int(samples), int(agreed), int(errors), window)


def decide(quality: QualityConfig, tier: Tier, stats: WindowStats) -> str | None:
    """'promote', 'demote' or None, from the current tier and the window."""
    agreement = stats.agreement
    if agreement is None or stats.samples < quality.min_samples:
        return None
    if tier is Tier.LIGHT and agreement < quality.promote_below:
        return "promote"
    if tier is Tier.COMPLEX and agreement > quality.demote_above:
        return "demote"
    return None


def evaluate(session: Session, config: AppConfig, tenant_id: uuid.UUID, task_type: str) -> str | None:
    """Promote or demote the task type if its window says so; returns the action taken, if any."""
    lock_task_type(session, tenant_id, task_type)
    rule = session.scalar(select(RoutingRule).where(RoutingRule.tenant_id == tenant_id,
                                                    RoutingRule.task_type == task_type))
    if rule is not None and rule.pinned:
        return None
    tier = rule.tier if rule is not None else (config_tier(config, task_type) or Tier.LIGHT)
    if tier is Tier.COMPLEX and (rule is None or rule.source != QUALITY_ACTOR):
        return None  # complex by someone's choice, not by the quality loop: not ours to demote
    stats = window_stats(session, tenant_id, task_type, config.quality.window, tier)
    action = decide(config.quality, tier, stats)
    if action is None:
        return None
    figures = stats.figures(config.quality)
    if rule is None and config_tier(config, task_type) is not None:
        # config [routing] becomes the tenant's rules first (as GET /v1/routes does), so the event says
        # which tier it moved from; a task type with neither rule nor config entry moves from `auto` (None)
        seed_rules(session, tenant_id, config)
    if action == "promote":
        reason = (f"agreement {stats.agreement:.1%} over {stats.samples} comparisons is below "
                  f"{config.quality.promote_below:.0%}")
        set_rule(session, tenant_id, task_type, Tier.COMPLEX, False, actor=QUALITY_ACTOR, action=action,
                 reason=reason, figures=figures, source=QUALITY_ACTOR)
    else:
        reason = (f"probe agreement {stats.agreement:.1%} over {stats.samples} comparisons is above "
                  f"{config.quality.demote_above:.0%}")
        set_rule(session, tenant_id, task_type, Tier.LIGHT, False, actor=QUALITY_ACTOR, action=action,
                 reason=reason, figures=figures, source=QUALITY_ACTOR)
    return action
