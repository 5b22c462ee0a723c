"""The OpenAI-compatible front door's immediate path: validate a chat completion
request, route it (`smart-select` or a configured model), call the chain with retries, fallbacks
and the shared cooldown, and record the call as a task with its ledger row, in one transaction.

The call is made from the API process itself (never through Celery). Bookkeeping goes through
`Recorder`, a group commit: concurrent calls are written together in one transaction (one
multi-row INSERT per table), and each caller waits for the commit of its own row before it answers.
A streamed call writes its rows when the stream ends, also when the client leaves midway.

Fail closed: a request is checked before any provider call, fields (`tierbatch.gateway.fields`: only what
the ledger can price is forwarded) and characters (nothing Postgres could not record); an answer
whose rows were not committed is withheld (a 503 `recording_failed`; a stream holds back its usage
chunk and `[DONE]` until the commit and ends with an error event instead). What a provider answers
is recorded as Postgres can store it, so no answer is lost to an unstorable character.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import psycopg
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base import inputs
from tierbatch.base.config import AppConfig, ImmediateConfig, ModelRef
from tierbatch.base.errors import (
    BudgetExceeded,
    ChainExhausted,
    InvalidInput,
    ModelNotFound,
    PermanentProviderError,
    ProviderError,
    RecordingFailed,
    RetryableProviderError,
)
from tierbatch.base.states import Mode, RequestedTier, TaskStatus, Tier
from tierbatch.cache.responses import (
    CachedAnswer,
    Claim,
    cache_key,
    fill_claim,
    lookup_or_claim,
    release_claim,
    take_hit,
    wants_cache,
)
from tierbatch.costs.budgets import check_budget
from tierbatch.db.bulk_sql import GATEWAY_WRITE
from tierbatch.gateway import fields as chat_fields
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.providers import openai_validation as shared
from tierbatch.providers.client import (
    AsyncProviderClients,
    ChatStream,
    RawChatAnswer,
    output_from_body,
    prompt_cache_key,
    usage_from_body,
)
from tierbatch.providers.cooldown import Admission, Cooldown
from tierbatch.providers.retry import backoff_delay
from tierbatch.routing.rules import RuleView, rule_decision, tenant_rules
from tierbatch.routing.tiers import prompt_text, resolve_tier

log = logging.getLogger(__name__)

SMART_SELECT = "smart-select"
MODEL_CREATED = 1_700_000_000  # `created` of the models we list: a fixed, plausible epoch
ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # in the order our 400 lists them
# A synchronous caller is waiting: a retry of the same model never sleeps longer than this
# (a longer `retry-after` sends the call down the chain, and cools the model down, instead).
MAX_INLINE_BACKOFF_SECONDS = 0.25


# --- tenants ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the gateway applies to a tenant's calls besides the request itself."""

    rules: dict[str, RuleView]  # routing rules by task type
    budget_refusal: str | None = None  # the monthly budget is reached under policy `reject`
    budget_downgrade: str | None = None  # ... under policy `downgrade`: the reason complex is served as light


class TenantPolicies:
    """A tenant's routing rules and budget decision, remembered for `ttl` seconds: a rule changed by a person
    or by the quality monitor, or a budget reached, applies to `smart-select` within that time, without
    queries per call."""

    def __init__(self, sessions: sessionmaker[Session], config: AppConfig, ttl: float = 5.0) -> None:
        self._sessions = sessions
        self._config = config
        self._ttl = ttl
        self._entries: dict[uuid.UUID, tuple[float, TenantPolicy]] = {}

    def _lookup(self, tenant_id: uuid.UUID) -> TenantPolicy:
        with self._sessions() as session:
            rules = tenant_rules(session, tenant_id)
            try:
                downgrade = check_budget(session, tenant_id, self._config)
            except BudgetExceeded as refused:
                return TenantPolicy(rules, budget_refusal=refused.message)
            return TenantPolicy(rules, budget_downgrade=downgrade)

    def forget(self, tenant_id: uuid.UUID) -> None:
        self._entries.pop(tenant_id, None)

    async def policy(self, tenant_id: uuid.UUID) -> TenantPolicy:
        now = time.monotonic()
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        found = await anyio.to_thread.run_sync(self._lookup, tenant_id)
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[tenant_id] = (now + self._ttl, found)
        return found


# --- request validation ------------------------------------------------------------------------------


def _refusal(refused: shared.InvalidRequest) -> InvalidInput:
    return InvalidInput(refused.message, refused.param, refused.code)


def _check_number(body: Mapping[str, Any], param: str, lo: float, hi: float | None, integer: bool) -> None:
    value = body.get(param)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise shared.invalid_type(param, "an integer" if integer else "a number", value)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f">= {lo:g}"
        raise shared.InvalidRequest(f"Invalid '{param}': expected a value {bound}, but got {value} instead.",
                                    param, "invalid_value")


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise shared.invalid_type("metadata", "an object", value)
    if len(value) > 16:
        raise shared.InvalidRequest("Invalid 'metadata': too many properties. Expected an object with at most 16 "
                                    f"properties, but got an object with {len(value)} properties instead.",
                                    "metadata", "object_above_max_properties")
    for key, item in value.items():
        if len(key) > 64:
            raise shared.InvalidRequest(f"Invalid 'metadata': key '{key[:20]}…' is longer than 64 characters.",
                                        "metadata", "invalid_value")
        if not isinstance(item, str):
            raise shared.invalid_type(f"metadata.{key}", "a string", item)
        if len(item) > 512:
            raise shared.InvalidRequest(f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                                        f"length 512, but got a string with length {len(item)} instead.",
                                        f"metadata.{key}", "string_above_max_length")
    switch = value.get("cache")  # ours: the response cache switch
    if switch is not None and switch not in ("on", "off"):
        raise shared.InvalidRequest(f"Invalid value for 'metadata.cache': '{switch}'. Supported values are: 'on' and "
                                    "'off'.", "metadata.cache", "invalid_value")
    return dict(value)


def _check_metadata(value: Any) -> dict[str, str]:
    """`metadata` as a dict (empty when absent), or the gateway's 400."""
    try:
        return _metadata(value)
    except shared.InvalidRequest as refused:
        raise _refusal(refused) from None


def validate_chat_body(body: Any, *, allow_stream: bool = True) -> dict[str, Any]:
    """OpenAI's checks of a chat completion request, with its messages; returns the body.

    First what can be recorded and which fields are accepted (`tierbatch.gateway.fields`: its docstring is the
    list), so no later message quotes a character that cannot be stored. The checks shared with the
    simulator are `tierbatch.providers.openai_validation`'s (its docstring lists where the two differ); the gateway adds
    `stream_options`, the number ranges, `stop`, `tools` and `metadata`, and refuses streaming for batch
    lines (`allow_stream=False`)."""
    try:
        body = shared.check_request_object(body)
        chat_fields.check_storable(body)
        chat_fields.check_fields(body)
        shared.check_model(body, name_missing=True)
        shared.check_messages(body.get("messages"), roles=ROLES)
        stream = shared.check_stream(body)
        if stream and not allow_stream:
            raise shared.InvalidRequest("Streaming is not supported for batch requests.", "stream", "invalid_value")
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise shared.invalid_type("stream_options", "an object", options)
            if not stream:
                raise shared.InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is "
                                            "enabled.", "stream_options", "invalid_value")
        _check_number(body, "n", 1, 128, integer=True)
        _check_number(body, "max_tokens", 1, None, integer=True)
        _check_number(body, "max_completion_tokens", 1, None, integer=True)
        _check_number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
        _check_number(body, "top_logprobs", 0, 20, integer=True)
        _check_number(body, "temperature", 0, 2, integer=False)
        _check_number(body, "top_p", 0, 1, integer=False)
        _check_number(body, "presence_penalty", -2, 2, integer=False)
        _check_number(body, "frequency_penalty", -2, 2, integer=False)
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
            raise shared.InvalidRequest("Invalid 'stop': expected a string or an array of at most 4 strings.",
                                        "stop", "invalid_value")
        shared.check_response_format(body.get("response_format"), typed_json_schema=False)
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise shared.invalid_type("tools", "an array", tools)
            for index, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise shared.invalid_type(f"tools[{index}]", "an object", tool)
                if not isinstance(tool.get("type"), str):
                    raise shared.missing(f"tools[{index}].type")
        _metadata(body.get("metadata"))
    except shared.InvalidRequest as refused:
        raise _refusal(refused) from None
    return body


# --- routing ---------------------------------------------------------------------------------------


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
        raise _refusal(refused) from None
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
    metadata = _check_metadata(body.get("metadata"))
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


# --- recording ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One gateway call: its task row, and its ledger row when a provider answered."""

    task_id: uuid.UUID
    tenant_id: uuid.UUID
    route: Route
    request: dict[str, Any]
    metadata: dict[str, str]
    status: TaskStatus  # succeeded | failed: the gateway stores finished calls only
    attempts: int
    created_at: datetime
    started_at: datetime
    provider: str | None = None
    requested_model: str | None = None
    served_model: str | None = None
    output: str | None = None
    response_json: str | None = None
    usage: TokenUsage | None = None
    usage_estimated: bool = False
    latency_ms: int | None = None
    error: str | None = None
    prices: Any = None  # PricedUsage | None
    cost_usd: Decimal | None = None
    baseline_cost_usd: Decimal | None = None
    mode: Mode = Mode.IMMEDIATE  # or `cache`: answered from the response cache


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_value(value: Any) -> str:
    """UUIDs, decimals and timestamps as Postgres reads them back from text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"), default=_json_value)


# Escapes Postgres cannot take in the rows' JSON text: a NUL (`\u0000`: escaped once in our values, twice
# in the provider's raw JSON) and a surrogate (in the provider's JSON; an escaped *pair* matches too, and
# only costs the slow path).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _storable_param(text: str) -> bool:
    """Whether Postgres takes this JSON text (substring searches and an encode: a regex alternation over
    the whole text would cost more than building it)."""
    if "\\u" in text and _UNSTORABLE_ESCAPE.search(text) is not None:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")  # fails on an unpaired surrogate, raw in our own values
    except UnicodeEncodeError:
        return False
    return True


def _storable_json(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return _json(inputs.storable(json.loads(text)))
    except (ValueError, RecursionError):
        return None


def _storable_record(r: CallRecord) -> CallRecord:
    """The record as Postgres can store it: what the provider answered with NUL characters or unpaired
    surrogates replaced (requests holding them are refused before any call)."""
    def text(value: str | None) -> str | None:
        return inputs.storable_text(value) if value is not None else None

    return dataclasses.replace(
        r, request=inputs.storable(r.request), metadata=inputs.storable(r.metadata),
        output=text(r.output), response_json=_storable_json(r.response_json), error=text(r.error),
        served_model=text(r.served_model), requested_model=text(r.requested_model),
        route=dataclasses.replace(r.route, reason=inputs.storable_text(r.route.reason),
                                  task_type=inputs.storable_text(r.route.task_type)))


def record_params(records: Sequence[CallRecord]) -> dict[str, str]:
    """The statement's two parameters: the task rows and the ledger rows, each a JSON array of objects.

    Always storable: a provider's answer holding characters Postgres refuses is stored with them
    replaced, so its task and ledger row are written all the same."""
    params = _record_params(records)
    if _storable_param(params["tasks"]) and _storable_param(params["ledger"]):
        return params
    return _record_params([_storable_record(r) for r in records])


def _record_params(records: Sequence[CallRecord]) -> dict[str, str]:
    tasks: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for r in records:
        usage = r.usage
        tasks.append({
            "id": r.task_id, "tenant_id": r.tenant_id, "task_type": r.route.task_type,
            "requested_tier": r.route.requested_tier.value, "tier": r.route.tier.value,
            "tier_reason": r.route.reason, "request": r.request, "metadata": r.metadata,
            "status": r.status, "provider": r.provider, "model": r.requested_model, "served_model": r.served_model,
            "output": r.output, "response": r.response_json,
            "input_tokens": usage.input_tokens if usage else None,
            "cached_tokens": usage.cached_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "reasoning_tokens": usage.reasoning_tokens if usage else None,
            "cost_usd": r.cost_usd, "baseline_cost_usd": r.baseline_cost_usd, "attempts": r.attempts,
            "error": r.error, "created_at": r.created_at, "started_at": r.started_at, "mode": r.mode.value,
        })
        if usage is None or r.provider is None:
            continue
        priced = r.prices
        ledger.append({
            "tenant_id": r.tenant_id, "task_id": r.task_id, "task_type": r.route.task_type,
            "tier": r.route.tier.value, "provider": r.provider, "requested_model": r.requested_model,
            "served_model": r.served_model, "input_tokens": usage.input_tokens,
            "cached_tokens": usage.cached_tokens, "output_tokens": usage.output_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "input_price": priced.prices.input if priced else None,
            "cached_input_price": priced.prices.cached_input if priced else None,
            "output_price": priced.prices.output if priced else None,
            "input_cost_usd": priced.input_cost if priced else None,
            "cached_input_cost_usd": priced.cached_input_cost if priced else None,
            "output_cost_usd": priced.output_cost if priced else None,
            "cost_usd": r.cost_usd, "baseline_cost_usd": r.baseline_cost_usd, "unpriced": r.cost_usd is None,
            "latency_ms": r.latency_ms, "usage_estimated": r.usage_estimated, "mode": r.mode.value,
        })
    return {"tasks": _dumps(tasks), "ledger": _dumps(ledger)}


class CallWriter:
    """Writes call records on the event loop, over one dedicated autocommit connection (opened on first
    use, reopened after an error): a group of records is one statement, one round trip, one transaction.

    With `durable=False` (the default) the connection uses `synchronous_commit = off`: the commit does
    not wait for the WAL flush (the disk's fsync, most of a write's latency). A commit is still atomic and
    ordered; only a crash of Postgres itself (not a clean restart, not a crash of the API) can lose the
    last fraction of a second of records. `durable=True` waits for the flush, like every other write.
    """

    def __init__(self, dsn: str, *, durable: bool = False) -> None:
        self._dsn = dsn
        self._durable = durable
        self._connection: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        connection = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        if not self._durable:
            await connection.execute("SET synchronous_commit = off")
        return connection

    async def write(self, records: Sequence[CallRecord]) -> None:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = await self._connect()
            await self._connection.execute(GATEWAY_WRITE, record_params(records))
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


WriteRecords = Callable[[Sequence[CallRecord]], Awaitable[None]]


class Recorder:
    """Group commit for call records: whoever is waiting when a write starts goes in the next one.

    One writer at a time per process; a caller's `record` returns once its rows are committed, and
    raises `RecordingFailed` when they were not (whatever the writer's error, also when the writer
    itself is cancelled). A group that fails is retried record by record, so one bad row cannot sink
    the others.
    """

    def __init__(self, write: WriteRecords, max_group: int = 500) -> None:
        self._write = write
        self._max_group = max_group
        self._pending: list[tuple[CallRecord, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, record: CallRecord) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        group: list[tuple[CallRecord, asyncio.Future[None]]] = []
        try:
            while self._pending:
                group, self._pending = self._pending[:self._max_group], self._pending[self._max_group:]
                try:
                    await self._write([r for r, _ in group])
                except Exception as exc:
                    if len(group) == 1:
                        log.exception("could not record gateway call %s", group[0][0].task_id)
                        _settle(group[0][1], RecordingFailed(f"the call could not be recorded: {exc}"))
                        continue
                    for record, future in group:
                        try:
                            await self._write([record])
                        except Exception as single:
                            log.exception("could not record gateway call %s", record.task_id)
                            _settle(future, RecordingFailed(f"the call could not be recorded: {single}"))
                        else:
                            _settle(future, None)
                else:
                    for _, future in group:
                        _settle(future, None)
        finally:
            # a writer stopped midway (cancelled, or an error of its own) leaves no caller waiting, and none
            # answering as if its rows were written
            left, self._pending = group + self._pending, []
            for _, future in left:
                _settle(future, RecordingFailed("the recorder stopped before the call was recorded"))

    async def aclose(self) -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# --- the call ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    task_id: uuid.UUID
    tier: Tier
    content: bytes  # the provider's body, relayed unchanged (its `model` is the served model)
    cost_usd: Decimal | None
    served_model: str
    cache_hit: bool = False


@dataclass(frozen=True, slots=True)
class _Answered:
    completed: Completed
    answer: RawChatAnswer | None


def format_cost(cost: Decimal | None) -> str:
    return "unpriced" if cost is None else format(cost.normalize(), "f")


class Gateway:
    def __init__(self, config: AppConfig, providers: AsyncProviderClients, cooldown: Cooldown, prices: PriceBook,
                 database_dsn: str, *, durable_records: bool = False,
                 sessions: sessionmaker[Session] | None = None, write: WriteRecords | None = None) -> None:
        """`write` commits a group of call records (default: `CallWriter` on `database_dsn`)."""
        self.config = config
        # the response cache needs the database; without sessions every call goes to a provider
        self.sessions = sessions
        self._flights: dict[tuple[uuid.UUID, bytes], asyncio.Future[None]] = {}
        self.providers = providers
        self.cooldown = cooldown
        self.prices = prices
        self.writer = CallWriter(database_dsn, durable=durable_records)
        self.recorder = Recorder(write or self.writer.write)
        self.policy: ImmediateConfig = config.immediate

    def warm_prices(self) -> None:
        """Look up every configured model's prices once, so the first call does not pay for it."""
        for ref in self.config.configured_models():
            self.prices.unit_prices(ref.provider, ref.model)
        self.prices.baseline(TokenUsage(0, 0, 0))

    async def _call_chain(self, chain: Sequence[ModelRef], opener: Callable[[ModelRef], Any]
                          ) -> tuple[Any, int]:
        """The first answer along the chain (retries, fallbacks, cooldown); raises ChainExhausted."""
        admissions = await self.cooldown.admit(chain)
        errors: list[ProviderError] = []
        calls = 0
        for admission in admissions:
            if not admission.allowed:
                continue
            tries = 1 if admission.probe else self.policy.retries_per_model + 1
            for attempt in range(tries):
                calls += 1
                try:
                    answer = await opener(admission.ref)
                except PermanentProviderError as exc:
                    errors.append(exc)
                    await self.cooldown.record_success(admission)  # it answered: the model is up
                    break
                except RetryableProviderError as exc:
                    errors.append(exc)
                    if await self._failed(admission, exc):
                        break
                    if attempt + 1 < tries:
                        await asyncio.sleep(min(backoff_delay(self.policy, attempt, exc.retry_after),
                                                MAX_INLINE_BACKOFF_SECONDS))
                else:
                    await self.cooldown.record_success(admission)
                    return answer, calls
        raise ChainExhausted(errors)

    async def _failed(self, admission: Admission, exc: RetryableProviderError) -> bool:
        """Count the failure; True when the chain should move on at once."""
        rate_limited = exc.status_code == 429
        opened = await self.cooldown.record_failure(admission, retry_after=exc.retry_after, rate_limited=rate_limited)
        return opened or rate_limited or admission.probe or (
            exc.retry_after is not None and exc.retry_after > MAX_INLINE_BACKOFF_SECONDS)

    async def _cooling_retry_after(self, chain: Sequence[ModelRef]) -> float | None:
        return await self.cooldown.retry_after(chain)

    def _price(self, provider: str, served: str, requested: str, usage: TokenUsage
               ) -> tuple[Any, Decimal | None, Decimal | None]:
        priced = self.prices.price(provider, served, requested, usage)
        return priced, (priced.total if priced is not None else None), self.prices.baseline(usage)

    async def _record_failure(self, tenant_id: uuid.UUID, task_id: uuid.UUID, call: ChatCall, started: datetime,
                              exhausted: ChainExhausted) -> ChainExhausted:
        """Record a call that no model answered; returns the error to raise, naming its task and, when
        no model was even tried, how long the chain cools down. Raises RecordingFailed when the failure
        itself could not be recorded."""
        cooling = await self._cooling_retry_after(call.route.chain) if not exhausted.errors else None
        await self.recorder.record(CallRecord(
            task_id, tenant_id, call.route, call.request, call.metadata, TaskStatus.FAILED,
            max(1, len(exhausted.errors)), call.received_at, started, error=str(exhausted)))
        return ChainExhausted(exhausted.errors, cooling, task_id)

    async def complete(self, tenant_id: uuid.UUID, call: ChatCall) -> Completed:
        """Answer a non-streamed call: from the response cache when it may be, else from a provider."""
        if self.sessions is None or not wants_cache(self.config.cache, call.route.task_type, call.request,
                                                    call.metadata):
            return await self._call_provider(tenant_id, call)
        key = cache_key(call.route.chain[0].model, call.request)
        flight_key = (tenant_id, key)
        # identical calls in this process wait for the first one's answer, then all read it at once; across
        # processes the cache row's claim does the same
        if (flight := self._flights.get(flight_key)) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(flight)
            hit = await anyio.to_thread.run_sync(self._take_hit, tenant_id, key)
            if hit is not None:
                return await self._serve_cached(tenant_id, call, hit)
        while (flight := self._flights.get(flight_key)) is not None:  # the first one failed: one retries
            with contextlib.suppress(Exception):
                await asyncio.shield(flight)
        flight = asyncio.get_running_loop().create_future()
        self._flights[flight_key] = flight
        try:
            found = await self._wait_for_cache(tenant_id, key)
            if isinstance(found, CachedAnswer):
                return await self._serve_cached(tenant_id, call, found)
            return await self._call_provider(tenant_id, call, found)
        finally:
            del self._flights[flight_key]
            flight.set_result(None)

    def _take_hit(self, tenant_id: uuid.UUID, key: bytes) -> CachedAnswer | None:
        assert self.sessions is not None
        with self.sessions.begin() as session:
            return take_hit(session, tenant_id, key)

    def _lookup_or_claim(self, tenant_id: uuid.UUID, key: bytes) -> CachedAnswer | Claim | None:
        assert self.sessions is not None
        with self.sessions.begin() as session:
            return lookup_or_claim(session, tenant_id, key, self.config.cache.claim_seconds)

    async def _wait_for_cache(self, tenant_id: uuid.UUID, key: bytes) -> CachedAnswer | Claim:
        while True:
            found = await anyio.to_thread.run_sync(self._lookup_or_claim, tenant_id, key)
            if found is not None:
                return found
            await asyncio.sleep(self.config.cache.wait_poll_seconds)  # in flight in another process

    def _settle_claim(self, claim: Claim, answer: CachedAnswer | None, task_id: uuid.UUID) -> None:
        assert self.sessions is not None
        with self.sessions.begin() as session:
            if answer is None:
                release_claim(session, claim)
            else:
                fill_claim(session, claim, answer, self.config.cache.ttl_seconds, task_id)

    async def _serve_cached(self, tenant_id: uuid.UUID, call: ChatCall, answer: CachedAnswer) -> Completed:
        """A cache hit: a task and a ledger row in mode `cache`, cost 0, the baseline of the tokens kept."""
        task_id = uuid.uuid4()
        now = datetime.now(UTC)
        usage = answer.usage
        baseline = self.prices.baseline(usage)
        content = json.dumps(answer.response, ensure_ascii=False).encode()
        await self.recorder.record(CallRecord(
            task_id, tenant_id, call.route, call.request, call.metadata, TaskStatus.SUCCEEDED, 0, call.received_at,
            now, provider=answer.provider, requested_model=answer.requested_model,
            served_model=answer.served_model, output=answer.output, response_json=content.decode(),
            usage=usage, latency_ms=0, cost_usd=Decimal(0), baseline_cost_usd=baseline, mode=Mode.CACHE))
        return Completed(task_id, call.route.tier, content, Decimal(0), answer.served_model, cache_hit=True)

    async def _call_provider(self, tenant_id: uuid.UUID, call: ChatCall, claim: Claim | None = None) -> Completed:
        try:
            done = await self._call_and_record(tenant_id, call)
        except BaseException:
            if claim is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._settle_claim, claim, None, uuid.uuid4())
            raise
        if claim is not None:
            answer = None
            if done.answer is not None:
                raw = done.answer
                answer = CachedAnswer(raw.provider, raw.requested_model, raw.served_model, output_from_body(raw.body),
                                      raw.body, usage_from_body(raw.body))
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._settle_claim, claim, answer, done.completed.task_id)
        return done.completed

    async def _call_and_record(self, tenant_id: uuid.UUID, call: ChatCall) -> _Answered:
        task_id = uuid.uuid4()
        started = datetime.now(UTC)
        request = call.request
        key = prompt_cache_key(call.route.task_type, tenant_id)  # a client's own key is kept as it is

        async def opener(ref: ModelRef) -> RawChatAnswer:
            return await self.providers.chat(ref.provider, ref.model, request, cache_key=key)

        try:
            answer, calls = await self._call_chain(call.route.chain, opener)
        except ChainExhausted as exhausted:
            raise await self._record_failure(tenant_id, task_id, call, started, exhausted) from None
        usage = usage_from_body(answer.body)
        served = answer.served_model
        priced, cost, baseline = self._price(answer.provider, served, answer.requested_model, usage)
        # the answer leaves only once its task and ledger row are committed (else RecordingFailed)
        await self.recorder.record(CallRecord(
            task_id, tenant_id, call.route, call.request, call.metadata, TaskStatus.SUCCEEDED, calls,
            call.received_at, started, provider=answer.provider, requested_model=answer.requested_model,
            served_model=served,
            output=output_from_body(answer.body), response_json=answer.content.decode("utf-8", "replace"),
            usage=usage, latency_ms=answer.latency_ms, prices=priced, cost_usd=cost,
            baseline_cost_usd=baseline))
        return _Answered(Completed(task_id, call.route.tier, answer.content, cost, served), answer)

    async def open_stream(self, tenant_id: uuid.UUID, call: ChatCall) -> StreamSession:
        """Open the provider stream along the chain (fallbacks happen before any byte is sent)."""
        task_id = uuid.uuid4()
        started = datetime.now(UTC)
        # usage is always asked of the provider (exact tokens for the ledger); the client gets the usage
        # chunk only if it asked for it
        request = {**call.request, "stream_options": {"include_usage": True}}
        key = prompt_cache_key(call.route.task_type, tenant_id)

        async def opener(ref: ModelRef) -> ChatStream:
            return await self.providers.open_stream(ref.provider, ref.model, request, cache_key=key)

        try:
            stream, calls = await self._call_chain(call.route.chain, opener)
        except ChainExhausted as exhausted:
            raise await self._record_failure(tenant_id, task_id, call, started, exhausted) from None
        return StreamSession(self, tenant_id, task_id, call, stream, calls, started)

    async def aclose(self) -> None:
        await self.recorder.aclose()
        await self.writer.aclose()


# --- streaming ---------------------------------------------------------------------------------------


@dataclass
class _Choice:
    content: list[str] = field(default_factory=list)
    role: str = "assistant"
    finish_reason: str | None = None
    tool_chars: int = 0
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)


class _Relay(enum.Enum):
    SEND = "send"  # to the client now
    HOLD = "hold"  # the end of the answer: to the client once the call is recorded
    DROP = "drop"  # not for the client


def _sse_error(message: str, type_: str, code: str) -> bytes:
    """An error event in OpenAI's stream shape (the SDKs raise it as an APIError)."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + _json(body).encode() + b"\n\n"


class StreamSession:
    """Relays the provider's SSE lines as they arrive and records the call when the stream ends.

    `events()` yields bytes for the client; when the provider's stream ends it records the call (exact
    usage from the provider's final chunk, or an estimate flagged as such when the stream stopped early),
    shielded from cancellation so a client that disconnects still leaves its task and ledger row behind.
    Fail closed: the end of the answer (the usage chunk and `[DONE]`) is held back until the task and
    ledger row are committed; if they cannot be, the stream ends with an error event instead. A stream
    the provider broke off ends with an error event too, never with `[DONE]`.
    """

    def __init__(self, gateway: Gateway, tenant_id: uuid.UUID, task_id: uuid.UUID, call: ChatCall,
                 stream: ChatStream, calls: int, started: datetime) -> None:
        self.gateway = gateway
        self.tenant_id = tenant_id
        self.task_id = task_id
        self.call = call
        self.tier = call.route.tier
        self._stream = stream
        self._calls = calls
        self._started = started
        self._clock = time.perf_counter()
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        self._meta: dict[str, Any] = {}
        self._done = False
        self._error: str | None = None
        self._error_relayed = False  # the provider's own error event reached the client
        self._finished: bool | None = None  # None until the call is recorded (or failed to be)

    def _observe(self, payload: str) -> _Relay:
        """Take note of one `data:` payload, and say where it goes."""
        if payload == "[DONE]":
            self._done = True
            return _Relay.HOLD
        try:
            chunk = json.loads(payload)
        except ValueError:
            return _Relay.SEND
        if not isinstance(chunk, dict):
            return _Relay.SEND
        if "error" in chunk:
            error = chunk.get("error")
            self._error = f"provider error in stream: {error}"
            self._error_relayed = True
            return _Relay.SEND
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None:
                self._meta[key] = chunk[key]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            state = self._choices.setdefault(int(choice.get("index") or 0), _Choice())
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                state.content.append(delta["content"])
            if isinstance(delta.get("role"), str):
                state.role = delta["role"]
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    slot = state.tool_calls.setdefault(int(call.get("index") or 0), {
                        "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                    if call.get("id"):
                        slot["id"] = call["id"]
                    function = call.get("function") or {}
                    slot["function"]["name"] += function.get("name") or ""
                    slot["function"]["arguments"] += function.get("arguments") or ""
                    state.tool_chars += len(function.get("arguments") or "") + len(function.get("name") or "")
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
            if not chunk.get("choices"):
                # we asked for it; the client gets it only if it did too
                return _Relay.HOLD if self.call.include_usage else _Relay.DROP
        return _Relay.SEND

    async def events(self) -> AsyncIterator[bytes]:
        held: list[bytes] = []
        try:
            async for line in self._stream.lines():
                if not line:
                    continue
                if line.startswith("data:"):
                    relay = self._observe(line[5:].strip())
                    if relay is _Relay.SEND:
                        yield line.encode() + b"\n\n"
                    elif relay is _Relay.HOLD:
                        held.append(line.encode() + b"\n\n")
                    if self._done:
                        break  # nothing follows `[DONE]`; do not wait for the provider to close
                else:
                    yield line.encode() + b"\n"
            if not self._done and self._error is None:
                self._error = "the provider's stream ended before the answer was complete"
        except ProviderError as exc:
            self._error = exc.message
        finally:
            with anyio.CancelScope(shield=True):
                recorded = await self._finish()
        # only reached when the stream ran to its end (a client that left closes the generator above)
        if not recorded:
            yield _sse_error(RecordingFailed().message, "server_error", "recording_failed")
        elif self._done and self._error is None:
            for event in held:
                yield event
        elif not self._error_relayed:
            yield _sse_error(self._error or "The provider's stream ended before the answer was complete.",
                             "server_error", "upstream_stream_broken")

    async def _finish(self) -> bool:
        """Close the provider stream and record the call, once; whether its rows are committed."""
        if self._finished is not None:
            return self._finished
        self._finished = False
        try:
            await self._stream.aclose()
        except Exception:  # the connection may already be gone
            log.debug("closing the provider stream failed", exc_info=True)
        try:
            await self.gateway.recorder.record(self._record())
        except RecordingFailed:
            log.error("stream %s: the call could not be recorded; its end is withheld", self.task_id)
            return False
        except Exception:
            log.exception("stream %s: the call could not be recorded; its end is withheld", self.task_id)
            return False
        self._finished = True
        return True

    def _output(self) -> str:
        first = self._choices.get(0)
        return "".join(first.content) if first else ""

    def _body(self, usage: TokenUsage | None) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {"role": state.role, "content": "".join(state.content) or None}
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
            choices.append({"index": index, "message": message, "finish_reason": state.finish_reason})
        body: dict[str, Any] = {"id": self._meta.get("id"), "object": "chat.completion",
                                "created": self._meta.get("created"), "model": self.served_model,
                                "choices": choices}
        if self._usage is not None:
            body["usage"] = self._usage
        return body

    @property
    def served_model(self) -> str:
        return str(self._meta.get("model") or self._stream.requested_model)

    def _estimate(self) -> TokenUsage:
        output_chars = sum(len("".join(c.content)) + c.tool_chars for c in self._choices.values())
        return TokenUsage(estimate_prompt_tokens(self.call.request.get("messages") or []), 0,
                          math.ceil(output_chars / 4))

    def _record(self) -> CallRecord:
        complete = self._done and self._error is None
        if self._usage is not None:
            usage, estimated = usage_from_body({"usage": self._usage}), False
        else:
            usage, estimated = self._estimate(), True
        error = self._error
        if not complete and error is None:
            error = "the client closed the stream before its end" if not self._done else None
        gateway = self.gateway
        provider, requested = self._stream.provider, self._stream.requested_model
        priced, cost, baseline = gateway._price(provider, self.served_model, requested, usage)
        return CallRecord(
            self.task_id, self.tenant_id, self.call.route, self.call.request, self.call.metadata,
            TaskStatus.SUCCEEDED if complete else TaskStatus.FAILED, self._calls, self.call.received_at, self._started,
            provider=provider, requested_model=requested, served_model=self.served_model, output=self._output(),
            response_json=_json(self._body(usage)), usage=usage, usage_estimated=estimated,
            latency_ms=int((time.perf_counter() - self._clock) * 1000), error=error, prices=priced,
            cost_usd=cost, baseline_cost_usd=baseline)
