"""The task rows of a job's items, in COPY column order: each task's request body, tier and id.

Speed matters here (the target is ≥ 20,000 tasks/s through `POST /v1/jobs`), so every task's request body
is the job's pre-serialized JSON with the item's text spliced in, and a tier that is the same for every
item is resolved once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tierbatch.base.config import AppConfig
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.cache.responses import wants_cache
from tierbatch.jobs.requests import TEXT_PLACEHOLDER, JobItem, JobSettings
from tierbatch.routing.rules import RuleView, rule_decision
from tierbatch.routing.tiers import resolve_tier, takes_batch_path

# Marks where an item's text goes in the pre-serialized request; json.dumps escapes it as \u0001.
_SLOT = "\x01tierbatch-text\x01"

# plain strs: the COPY's rows are built per item on a benchmarked path
_QUEUED = TaskStatus.QUEUED.value
_WAITING_BATCH = TaskStatus.WAITING_BATCH.value
_LIGHT = Tier.LIGHT.value
_BATCH_MODE = Mode.BATCH.value


def label_response_format(labels: Sequence[str]) -> dict[str, Any]:
    """The JSON-schema response format that asks for one of `labels` as `{"label": ...}`."""
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"], "additionalProperties": False}}}


def request_params(settings: JobSettings) -> dict[str, Any]:
    params = dict(settings.params)
    if settings.labels is not None:
        params["response_format"] = label_response_format(settings.labels)
    return params


def system_messages(settings: JobSettings) -> list[dict[str, Any]]:
    return [{"role": "system", "content": settings.system}] if settings.system is not None else []


def render_text(settings: JobSettings, text_value: str) -> str:
    return settings.template.replace(TEXT_PLACEHOLDER, text_value)


def item_messages(settings: JobSettings, item: JobItem) -> list[dict[str, Any]]:
    """The chat messages of one item: the job's system prompt, then the rendered text (or its messages)."""
    if item.messages is not None:
        if settings.system is not None and item.messages and item.messages[0].get("role") == "system":
            return item.messages  # the item brings its own system prompt
        return [*system_messages(settings), *item.messages]
    return [*system_messages(settings), {"role": "user", "content": render_text(settings, item.text or "")}]


class RequestEncoder:
    """Serializes a task's request body fast: the job's JSON with the text spliced in at one slot."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.params = request_params(settings)
        template = json.dumps({"messages": [*system_messages(settings), {"role": "user", "content": _SLOT}],
                               **self.params}, ensure_ascii=False)
        slot = json.dumps(_SLOT, ensure_ascii=False)
        self.prefix, found, self.suffix = template.partition(slot)
        assert found, "the text slot must appear in the serialized request"
        head, _, tail = settings.template.partition(TEXT_PLACEHOLDER)
        self.simple_template = TEXT_PLACEHOLDER not in tail
        self.head, self.tail = head, tail

    def encode(self, item: JobItem) -> str:
        if item.text is not None:
            content = self.head + item.text + self.tail if self.simple_template else render_text(
                self.settings, item.text)
            return self.prefix + json.dumps(content, ensure_ascii=False) + self.suffix
        return json.dumps({"messages": item_messages(self.settings, item), **self.params}, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class TierChoice:
    tier: str
    reason: str


def tier_chooser(settings: JobSettings, config: AppConfig, budget_reason: str | None = None,
                 rules: Mapping[str, RuleView] | None = None) -> Callable[[JobItem], TierChoice]:
    """The tier of each item, first that applies: the job's explicit tier → the tenant's
    routing rule for the job's task type (`rules`, from `tenant_rules`, loaded once per request) →
    config `[routing]` → the prompt heuristic. All but the last are the same for every item: resolved
    once. Over a budget with the `downgrade` policy (`budget_reason`), complex items are stored as
    light, saying so."""
    fixed = _fixed_choice(settings, config, rules or {})
    if fixed is not None:
        same = fixed if budget_reason is None else _downgraded(fixed, budget_reason)
        return lambda _item: same

    def per_item(item: JobItem) -> TierChoice:
        decision = resolve_tier(config, settings.tier, settings.task_type, item_messages(settings, item))
        return TierChoice(decision.tier.value, decision.reason)

    if budget_reason is None:
        return per_item
    reason = budget_reason
    return lambda item: _downgraded(per_item(item), reason)


def _downgraded(choice: TierChoice, budget_reason: str) -> TierChoice:
    if choice.tier != Tier.COMPLEX.value:
        return choice
    return TierChoice(Tier.LIGHT.value, f"{budget_reason} (was: {choice.reason})")


def _fixed_choice(settings: JobSettings, config: AppConfig, rules: Mapping[str, RuleView]) -> TierChoice | None:
    """The tier every item of the job gets, or None when the heuristic decides per item."""
    rule = rule_decision(rules, settings.tier, settings.task_type)  # None unless the tier is auto
    if rule is not None:
        return TierChoice(rule.tier.value, rule.reason)
    configured = config.routing.get(settings.task_type)
    if settings.tier is not RequestedTier.AUTO or (configured is not None and configured is not RequestedTier.AUTO):
        decision = resolve_tier(config, settings.tier, settings.task_type, [])
        return TierChoice(decision.tier.value, decision.reason)
    return None


@dataclass(frozen=True, slots=True)
class BatchRoute:
    """Where a job's Light tasks go when their route is already known as they are written."""

    provider: str
    model: str


def direct_batch_route(settings: JobSettings, config: AppConfig, now: datetime) -> BatchRoute | None:
    """The provider and model of the batch path for the job's Light items, or None when they must be routed
    once stored (`tierbatch.tasks.store.route_queued_tasks`).

    Everything routing decides for a job's Light task is the same for every item of the job: not urgent,
    a deadline the batch path can meet, a light provider with a Batch API (not the background lane), and
    requests the response cache may not answer (temperature, seed, `n` and the cache switch are the job's).
    Those tasks are written straight into `waiting_batch`: no second write of each row, no dispatch
    message, and the batches fill as soon as the upload commits.
    """
    if not takes_batch_path(config, Tier.LIGHT, settings.urgent, settings.deadline, now):
        return None
    if wants_cache(config.cache, settings.task_type, request_params(settings), settings.metadata):
        return None
    light = config.tier(Tier.LIGHT)
    return BatchRoute(light.provider, light.model)


def task_rows(items: Sequence[JobItem], ids: Sequence[uuid.UUID], settings: JobSettings, config: AppConfig,
              tenant_id: uuid.UUID, job_id: uuid.UUID, now: datetime, budget_reason: str | None = None,
              rules: Mapping[str, RuleView] | None = None) -> Iterator[tuple[Any, ...]]:
    """COPY rows in `tierbatch.db.bulk_sql.TASK_COPY_COLUMNS` order: `waiting_batch` for a Light item whose
    route is known (`direct_batch_route`), `queued` (routed after the commit) for any other."""
    encode = RequestEncoder(settings).encode
    choose = tier_chooser(settings, config, budget_reason, rules)
    route = direct_batch_route(settings, config, now)
    metadata = json.dumps(settings.metadata, ensure_ascii=False)
    tenant, job = str(tenant_id), str(job_id)
    requested = settings.tier.value
    for task_id, item in zip(ids, items, strict=True):
        choice = choose(item)
        if route is not None and choice.tier == _LIGHT:
            status, mode, provider, model = _WAITING_BATCH, _BATCH_MODE, route.provider, route.model
        else:
            status, mode, provider, model = _QUEUED, None, None, None
        yield (task_id, item.id, encode(item), choice.tier, choice.reason, tenant, job, settings.task_type,
               requested, settings.urgent, settings.deadline, metadata, status, 0, now, mode, provider, model)
