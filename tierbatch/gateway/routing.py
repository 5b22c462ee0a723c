"""Where a validated chat completion request goes: `smart-select` (the tenant's routing rule, then config
routing and the heuristic) or a configured model asked by name, under the tenant's budget policy; what
goes to the provider; and the token estimates of a call whose provider did not report its usage."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tierbatch.base.config import AppConfig, ModelRef
from tierbatch.base.errors import BudgetExceeded, InvalidInput, ModelNotFound
from tierbatch.base.states import RequestedTier, Tier
from tierbatch.gateway import fields as chat_fields
from tierbatch.gateway.policies import TenantPolicy
from tierbatch.gateway.validation import check_metadata, refusal, validate_chat_body
from tierbatch.providers import openai_validation as shared
from tierbatch.routing.rules import RuleView, rule_decision
from tierbatch.routing.tiers import prompt_text, resolve_tier

SMART_SELECT = "smart-select"
MODEL_CREATED = 1_700_000_000  # `created` of the models we list: a fixed, plausible epoch


@dataclass(frozen=True, slots=True)
class Route:
    tier: Tier
    requested_tier: RequestedTier
    reason: str
    task_type: str
    chain: list[ModelRef]


def _tier_hint(value: str | None, param: str) -> RequestedTier:
    if value is None or value == "":
        return RequestedTier.AUTO
    try:
        return RequestedTier(value.strip().lower())
    except ValueError:
        raise InvalidInput(f"Invalid value for '{param}': '{value}'. Supported values are: 'light', 'complex', "
                          "'auto'.", param, "invalid_value") from None


def _task_type_hint(value: str | None, param: str) -> str:
    if value is None or not value.strip():
        return "general"
    value = value.strip()
    if len(value) > 100:
        raise InvalidInput(f"Invalid '{param}': at most 100 characters.", param, "invalid_value")
    try:
        chat_fields.check_storable(value, param)
    except shared.InvalidRequest as refused:
        raise refusal(refused) from None
    return value


def model_chain(config: AppConfig, model: str) -> tuple[Tier, list[ModelRef]] | None:
    """A configured model asked by name: its tier and the chain from it on (the model, then its fallbacks).

    A model that is the primary of a tier belongs to that tier; otherwise the first tier listing it wins.
    """
    for tier_name, tier in config.tiers.items():
        if tier.model == model:
            return Tier(tier_name), tier.chain
    for tier_name, tier in config.tiers.items():
        for index, ref in enumerate(tier.chain):
            if ref.model == model:
                return Tier(tier_name), tier.chain[index:]
    return None


def listed_models(config: AppConfig) -> list[dict[str, Any]]:
    """`smart-select` and every configured model, as OpenAI `Model` objects."""
    out = [{"id": SMART_SELECT, "object": "model", "created": MODEL_CREATED, "owned_by": "tierbatch"}]
    seen = {SMART_SELECT}
    for ref in config.configured_models():
        if ref.model not in seen:
            seen.add(ref.model)
            out.append({"id": ref.model, "object": "model", "created": MODEL_CREATED, "owned_by": ref.provider})
    return out


def route_request(config: AppConfig, model: str, messages: Sequence[Mapping[str, Any]], *,
                  tier_hint: str | None, task_type_hint: str | None, tools_requested: bool,
                  tier_param: str = "metadata.tier", task_type_param: str = "metadata.task_type",
                  rules: Mapping[str, RuleView] | None = None) -> Route:
    task_type = _task_type_hint(task_type_hint, task_type_param)
    requested = _tier_hint(tier_hint, tier_param)
    if model == SMART_SELECT:
        # the tenant's routing rule comes before config routing and the heuristic
        decision = (rule_decision(rules or {}, requested, task_type)
                    or resolve_tier(config, requested, task_type, messages, tools_requested=tools_requested))
        return Route(decision.tier, requested, f"smart-select: {decision.reason}", task_type,
                     config.tier(decision.tier).chain)
    named = model_chain(config, model)
    if named is None:
        raise ModelNotFound(model)
    tier, chain = named
    return Route(tier, RequestedTier(tier.value), f"model {model!r} asked by name", task_type, chain)


_TO_PROVIDER = chat_fields.FORWARDED_FIELDS | {"stream", "stream_options"}


def provider_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """What goes to the provider: the fields `tierbatch.gateway.fields` forwards, as given, plus `stream` and
    `stream_options` for the caller to take off; never `model` (chosen per call), `metadata` (ours) or
    a refused field left null."""
    return {k: v for k, v in body.items() if k in _TO_PROVIDER}


def apply_budget_policy(config: AppConfig, route: Route, policy: TenantPolicy) -> Route:
    """Over the tenant's monthly budget: `reject` refuses the call with 402, `downgrade` serves a
    complex call on the light tier's chain, saying so in the task's tier reason."""
    if policy.budget_refusal is not None:
        raise BudgetExceeded(f"Monthly budget reached: {policy.budget_refusal}", None, "budget_exceeded")
    if policy.budget_downgrade is not None and route.tier is Tier.COMPLEX:
        return Route(Tier.LIGHT, route.requested_tier, f"{policy.budget_downgrade} (was: {route.reason})",
                     route.task_type, config.tier(Tier.LIGHT).chain)
    return route


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A validated, routed chat completion request."""

    model: str  # as asked: smart-select or a configured model
    route: Route
    request: dict[str, Any]  # to the provider, without model
    metadata: dict[str, str]
    stream: bool
    include_usage: bool
    received_at: datetime


def prepare_chat_call(config: AppConfig, body: Any, headers: Mapping[str, str],
                      policy: TenantPolicy | None = None) -> ChatCall:
    received = datetime.now(UTC)
    body = validate_chat_body(body)
    metadata = check_metadata(body.get("metadata"))
    tier_hint, tier_param = metadata.get("tier"), "metadata.tier"
    if tier_hint is None and headers.get("x-tier") is not None:
        tier_hint, tier_param = headers.get("x-tier"), "X-Tier"
    type_hint, type_param = metadata.get("task_type"), "metadata.task_type"
    if type_hint is None and headers.get("x-task-type") is not None:
        type_hint, type_param = headers.get("x-task-type"), "X-Task-Type"
    route = route_request(config, body["model"], body["messages"], tier_hint=tier_hint, task_type_hint=type_hint,
                          tools_requested=bool(body.get("tools") or body.get("functions")),
                          tier_param=tier_param, task_type_param=type_param,
                          rules=policy.rules if policy is not None else None)
    if policy is not None:
        route = apply_budget_policy(config, route, policy)
    request = provider_request(body)
    stream = bool(request.pop("stream", False))
    options = request.pop("stream_options", None)
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ChatCall(body["model"], route, request, metadata, stream, include_usage, received)


# --- token estimates ---------------------------------------------------------------------------------


def estimate_tokens(text_value: str) -> int:
    """About four characters per token, the usual rule of thumb for English text."""
    return math.ceil(len(text_value) / 4) if text_value else 0


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return estimate_tokens(prompt_text(messages)) + 4 * len(messages)
