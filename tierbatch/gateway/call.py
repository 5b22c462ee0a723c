"""The OpenAI-compatible front door's immediate path: call the chain of a routed chat completion
request (`tierbatch.gateway.routing`) with retries, fallbacks and the shared cooldown, or answer it from
the response cache, and record the call as a task with its ledger row, in one transaction
(`tierbatch.gateway.recorder`).

The call is made from the API process itself (never through Celery). Fail closed: a request is checked
before any provider call (`tierbatch.gateway.validation`); an answer whose rows were not committed is
withheld (a 503 `recording_failed`; a stream, `tierbatch.gateway.stream`, holds back its usage chunk and
`[DONE]` until the commit and ends with an error event instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base.config import AppConfig, ImmediateConfig, ModelRef
from tierbatch.base.errors import ChainExhausted, PermanentProviderError, ProviderError, RetryableProviderError
from tierbatch.base.ids import new_task_id
from tierbatch.base.states import Mode, TaskStatus, Tier
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
from tierbatch.gateway.recorder import CallRecord, Recorder, call_costs
from tierbatch.gateway.routing import ChatCall
from tierbatch.gateway.stream import StreamSession
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.providers.adapter import ChatStream, RawChatAnswer, output_from_body, usage_from_body
from tierbatch.providers.cache_keys import prompt_cache_key
from tierbatch.providers.client import AsyncProviderClients
from tierbatch.providers.cooldown import Admission, Cooldown
from tierbatch.providers.retry import backoff_delay

# A synchronous caller is waiting: a retry of the same model never sleeps longer than this
# (a longer `retry-after` sends the call down the chain, and cools the model down, instead).
MAX_INLINE_BACKOFF_SECONDS = 0.25


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
                 recorder: Recorder, *, sessions: sessionmaker[Session] | None = None) -> None:
        """`recorder` commits the call records; whoever built it (and its writer) drains and closes them:
        the gateway opens nothing it would have to close."""
        self.config = config
        # the response cache needs the database; without sessions every call goes to a provider
        self.sessions = sessions
        self._flights: dict[tuple[uuid.UUID, bytes], asyncio.Future[None]] = {}
        self.providers = providers
        self.cooldown = cooldown
        self.prices = prices
        self.recorder = recorder
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
        return call_costs(self.prices, provider, served, requested, usage)

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
        task_id = new_task_id()
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
        task_id = new_task_id()
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
        task_id = new_task_id()
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
        return StreamSession(self.recorder, self.prices, tenant_id, task_id, call, stream, calls, started)
