"""Response cache: not paying twice for the same answer.

- What is identical: the same tenant, the tier's model (the model asked first) and the request body
  (messages and parameters), hashed with SHA-256 over canonical JSON. Fields that do not change the
  answer (`metadata`, `stream`, `stream_options`, `user`, `store`, `prompt_cache_key`) are left out.
- What is cached: by default only deterministic requests (`temperature` 0, or no temperature and a
  `seed`; `n` 1). `[cache.task_types]` sets a task type to `always` or `off`; `metadata.cache = "off"`
  bypasses the cache for one request (and `"on"` asks for it).
- Where: Postgres (`response_cache`), durable and shared by every worker and API process. A hit is
  served as mode `cache`: a ledger row with cost 0 and the baseline of the tokens the answer took.
- Expiry: every entry has `expires_at`; a lookup ignores expired rows, an expired row is taken over in
  place by the next identical request, and `purge_expired_entries` deletes them through the index on
  `expires_at` (never a scan of live entries).
- In flight: the first caller of a key claims it (a `pending` row with an owner token and a short
  deadline) and calls the provider; identical callers find the claim and wait for the answer (poll),
  so N identical concurrent requests make one provider call. A claimer that fails releases its claim;
  one that dies leaves a claim that expires at its deadline and is taken over.

Functions that take a session don't commit: each step is meant to be its own short transaction, so a
claim is visible to the others at once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, insert
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig, CacheConfig
from tierbatch.base.states import CacheEntryStatus, TaskStatus
from tierbatch.db.models import ResponseCacheEntry, Task
from tierbatch.ledger.pricing import TokenUsage
from tierbatch.metrics.catalog import CACHE_LOOKUPS
from tierbatch.metrics.commit import after_commit

# A multi-row INSERT of cache entries binds about 20 parameters per row; Postgres takes at most 65,535 per
# statement, so a batch chunk's answers (10,000 lines by default) are stored in several statements.
STORE_ROWS_PER_STATEMENT = 2000
# Request fields that do not change the answer; they are left out of the key.
_NOT_IN_KEY = frozenset({"metadata", "stream", "stream_options", "user", "store", "prompt_cache_key"})
METADATA_SWITCH = "cache"  # metadata.cache = "off" | "on"


def check_cache_switch(metadata: Mapping[str, Any] | None) -> None:
    """`metadata.cache`, when given, is "on" or "off" (ValueError otherwise)."""
    switch = (metadata or {}).get(METADATA_SWITCH)
    if switch is not None and switch not in ("on", "off"):
        raise ValueError(f"metadata.cache must be \"on\" or \"off\" (got {switch!r})")


def is_deterministic(request: Mapping[str, Any]) -> bool:
    """Temperature 0, or no temperature and a seed; one choice."""
    if request.get("n") not in (None, 1):
        return False
    temperature = request.get("temperature")
    if temperature is not None:
        return bool(temperature == 0)
    return request.get("seed") is not None


def wants_cache(config: CacheConfig, task_type: str, request: Mapping[str, Any],
                metadata: Mapping[str, Any] | None) -> bool:
    """Whether this request may be answered from (and fill) the cache."""
    if not config.enabled:
        return False
    switch = (metadata or {}).get(METADATA_SWITCH)
    if switch == "off":
        return False
    if switch == "on":
        return request.get("n") in (None, 1)
    policy = config.task_types.get(task_type, "deterministic")
    if policy == "off":
        return False
    if policy == "always":
        return request.get("n") in (None, 1)
    return is_deterministic(request)


def maybe_cacheable(cache: CacheConfig) -> ColumnElement[bool]:
    """SQL prefilter for `wants_cache` over task rows: only the tasks it lets through are read and hashed
    (bulk paths, where most requests are not cacheable, pay one boolean per row)."""
    conditions: list[ColumnElement[bool]] = [
        Task.task_metadata["cache"].astext == "on",
        Task.request["temperature"].as_float() == 0,
        and_(Task.request.has_key("seed"), ~Task.request.has_key("temperature")),
    ]
    always = [t for t, policy in cache.task_types.items() if policy == "always"]
    if always:
        conditions.append(Task.task_type.in_(always))
    return or_(*conditions)


def cache_key(model: str, request: Mapping[str, Any]) -> bytes:
    """SHA-256 of the model and the request's answer-relevant fields, as canonical JSON."""
    canonical = {k: v for k, v in request.items() if k not in _NOT_IN_KEY}
    text_form = json.dumps({"model": model, "request": canonical}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(text_form.encode()).digest()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    provider: str
    requested_model: str
    served_model: str
    output: str | None
    response: dict[str, Any]
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class Claim:
    """This caller computes the answer for everyone asking the same thing."""

    tenant_id: uuid.UUID
    key: bytes
    owner: uuid.UUID


def _answer(row: Any) -> CachedAnswer:
    return CachedAnswer(row.provider, row.requested_model or row.served_model, row.served_model, row.output,
                        row.response, TokenUsage(row.input_tokens or 0, row.cached_tokens or 0,
                                                 row.output_tokens or 0, row.reasoning_tokens or 0))


_ANSWER_COLUMNS = (ResponseCacheEntry.provider, ResponseCacheEntry.requested_model, ResponseCacheEntry.served_model,
                   ResponseCacheEntry.output, ResponseCacheEntry.response, ResponseCacheEntry.input_tokens,
                   ResponseCacheEntry.cached_tokens, ResponseCacheEntry.output_tokens,
                   ResponseCacheEntry.reasoning_tokens)


def _seconds(value: float) -> Any:
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, value)


def _count_lookups(session: Session, *, hits: int = 0, misses: int = 0) -> None:
    def count() -> None:
        if hits:
            CACHE_LOOKUPS.labels("hit").inc(hits)
        if misses:
            CACHE_LOOKUPS.labels("miss").inc(misses)

    after_commit(session, count)


def take_hit(session: Session, tenant_id: uuid.UUID, key: bytes) -> CachedAnswer | None:
    """The live answer for the key, counting the hit (one statement), or None."""
    row = session.execute(
        update(ResponseCacheEntry)
        .where(ResponseCacheEntry.tenant_id == tenant_id, ResponseCacheEntry.key == key,
               ResponseCacheEntry.status == CacheEntryStatus.READY, ResponseCacheEntry.expires_at > func.now())
        .values(hits=ResponseCacheEntry.hits + 1)
        .returning(*_ANSWER_COLUMNS)
    ).one_or_none()
    if row is None:
        return None  # not a miss yet: the caller may wait for an identical call in flight (`claim_key` counts)
    _count_lookups(session, hits=1)
    return _answer(row)


def claim_key(session: Session, tenant_id: uuid.UUID, key: bytes, claim_seconds: float) -> Claim | None:
    """Claim the key for computing its answer: a new row, or an expired one (an old answer past its TTL,
    or the claim of a caller that died) taken over in place. None: someone else holds a live entry."""
    owner = uuid.uuid4()
    fresh = {"status": CacheEntryStatus.PENDING, "owner": owner, "expires_at": _seconds(claim_seconds),
             "provider": None, "requested_model": None, "served_model": None, "output": None, "response": None,
             "input_tokens": None, "cached_tokens": None, "output_tokens": None, "reasoning_tokens": None,
             "source_task_id": None, "hits": 0, "created_at": func.now()}
    statement = insert(ResponseCacheEntry).values(tenant_id=tenant_id, key=key, **fresh)
    won = session.scalar(statement.on_conflict_do_update(
        index_elements=[ResponseCacheEntry.tenant_id, ResponseCacheEntry.key], set_=fresh,
        where=ResponseCacheEntry.expires_at <= func.now(),
    ).returning(ResponseCacheEntry.owner))
    if won != owner:
        return None
    _count_lookups(session, misses=1)  # this caller computes the answer: the lookup missed
    return Claim(tenant_id, key, owner)


def fill_claim(session: Session, claim: Claim, answer: CachedAnswer, ttl_seconds: float,
               source_task_id: uuid.UUID | None) -> bool:
    """pending → ready with the answer; False if the claim was lost (expired and taken over)."""
    usage = answer.usage
    moved = session.execute(
        update(ResponseCacheEntry)
        .where(ResponseCacheEntry.tenant_id == claim.tenant_id, ResponseCacheEntry.key == claim.key,
               ResponseCacheEntry.owner == claim.owner)
        .values(status=CacheEntryStatus.READY, owner=None, provider=answer.provider,
                requested_model=answer.requested_model, served_model=answer.served_model, output=answer.output,
                response=answer.response, input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens,
                output_tokens=usage.output_tokens, reasoning_tokens=usage.reasoning_tokens,
                source_task_id=source_task_id, created_at=func.now(), expires_at=_seconds(ttl_seconds))
        .returning(ResponseCacheEntry.key)
    ).first()
    return moved is not None


def lookup_or_claim(session: Session, tenant_id: uuid.UUID, key: bytes, claim_seconds: float
                    ) -> CachedAnswer | Claim | None:
    """A live answer (a hit), a claim (compute it), or None (an identical request is in flight: wait)."""
    return take_hit(session, tenant_id, key) or claim_key(session, tenant_id, key, claim_seconds)


def release_claim(session: Session, claim: Claim) -> None:
    """Give a claim up (the call failed): the next identical request claims the key anew."""
    session.execute(delete(ResponseCacheEntry).where(
        ResponseCacheEntry.tenant_id == claim.tenant_id, ResponseCacheEntry.key == claim.key,
        ResponseCacheEntry.owner == claim.owner))


def _array(name: str, values: Sequence[Any], item_type: Any) -> BindParameter[Any]:
    return bindparam(name, value=list(values), type_=ARRAY(item_type))


def take_hits(session: Session, wanted: Sequence[tuple[uuid.UUID, bytes]]) -> dict[tuple[uuid.UUID, bytes],
                                                                                    CachedAnswer]:
    """The live answers for many (tenant, key) pairs in one statement, counting one hit per pair asked."""
    if not wanted:
        return {}
    counts: dict[tuple[uuid.UUID, bytes], int] = {}
    for pair in wanted:
        counts[pair] = counts.get(pair, 0) + 1
    pairs = list(counts)
    # the rows are locked in key order first: two routings of chunks sharing repeated requests, in
    # transactions of their own, would otherwise lock them in their arrays' orders and deadlock
    rows = session.execute(text(
        "WITH v AS (SELECT * FROM unnest(:tenants, :keys, :counts) AS v(tenant_id, key, n)), "
        "locked AS (SELECT c.tenant_id, c.key, v.n FROM response_cache AS c "
        "  JOIN v ON c.tenant_id = v.tenant_id AND c.key = v.key "
        "  WHERE c.status = 'ready' AND c.expires_at > now() ORDER BY c.tenant_id, c.key FOR UPDATE OF c) "
        "UPDATE response_cache AS c SET hits = c.hits + l.n FROM locked AS l "
        "WHERE c.tenant_id = l.tenant_id AND c.key = l.key "
        "RETURNING c.tenant_id, c.key, c.provider, c.requested_model, c.served_model, c.output, c.response, "
        "c.input_tokens, c.cached_tokens, c.output_tokens, c.reasoning_tokens"
    ).bindparams(_array("tenants", [p[0] for p in pairs], PG_UUID(as_uuid=True)),
                 _array("keys", [p[1] for p in pairs], BYTEA()),
                 _array("counts", [counts[p] for p in pairs], Integer())))
    found = {(row.tenant_id, bytes(row.key)): _answer(row) for row in rows}
    hits = sum(counts[pair] for pair in found)
    _count_lookups(session, hits=hits, misses=len(wanted) - hits)
    return found


def store_answers(session: Session, entries: Sequence[tuple[uuid.UUID, bytes, CachedAnswer, uuid.UUID]],
                  ttl_seconds: float) -> None:
    """Fill the cache from answers obtained without a claim (batch lines): a live entry is kept as it is."""
    if not entries:
        return
    seen: dict[tuple[uuid.UUID, bytes], dict[str, Any]] = {}
    for tenant_id, key, answer, task_id in entries:
        usage = answer.usage
        seen[(tenant_id, key)] = {
            "tenant_id": tenant_id, "key": key, "status": CacheEntryStatus.READY, "owner": None,
            "provider": answer.provider, "requested_model": answer.requested_model,
            "served_model": answer.served_model, "output": answer.output, "response": answer.response,
            "input_tokens": usage.input_tokens, "cached_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens,
            "source_task_id": task_id, "expires_at": _seconds(ttl_seconds)}
    # in key order: two chunks of a batch written at once take their entries' row locks in the same order;
    # in statements of at most STORE_ROWS_PER_STATEMENT rows, under the protocol's 65,535 bound parameters
    rows = [seen[key] for key in sorted(seen)]
    for start in range(0, len(rows), STORE_ROWS_PER_STATEMENT):
        statement = insert(ResponseCacheEntry).values(rows[start:start + STORE_ROWS_PER_STATEMENT])
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[ResponseCacheEntry.tenant_id, ResponseCacheEntry.key],
            set_={name: excluded[name] for name in (
                "status", "owner", "provider", "requested_model", "served_model", "output", "response",
                "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "source_task_id",
                "expires_at")},
            where=ResponseCacheEntry.expires_at <= func.now(),
        )
        session.execute(statement)


def fill_from_succeeded_tasks(session: Session, config: AppConfig, task_ids: Sequence[uuid.UUID]) -> int:
    """Cache the answers of tasks that just succeeded without a claim (batch lines); returns how many."""
    if not config.cache.enabled or not task_ids:
        return 0
    rows = session.execute(
        select(Task.id, Task.tenant_id, Task.task_type, Task.tier, Task.request, Task.task_metadata, Task.provider,
               Task.model, Task.served_model, Task.output, Task.response, Task.input_tokens, Task.cached_tokens,
               Task.output_tokens, Task.reasoning_tokens)
        # one array literal: a chunk's 10,000 ids adapted one by one cost more than the query's lookups
        .where(Task.id == any_(cast(bindparam("ids", "{" + ",".join(map(str, task_ids)) + "}", type_=Text),
                                    ARRAY(PG_UUID(as_uuid=True)))),
               Task.status == TaskStatus.SUCCEEDED, Task.response.is_not(None), Task.shadow_of.is_(None),
               maybe_cacheable(config.cache))
    ).all()
    entries = [
        (row.tenant_id, cache_key(config.tier(row.tier).model, row.request),
         CachedAnswer(row.provider or "", row.model or row.served_model, row.served_model, row.output, row.response,
                      TokenUsage(row.input_tokens or 0, row.cached_tokens or 0, row.output_tokens or 0,
                                 row.reasoning_tokens or 0)), row.id)
        for row in rows if row.served_model and wants_cache(config.cache, row.task_type, row.request,
                                                            row.task_metadata)]
    store_answers(session, entries, config.cache.ttl_seconds)
    return len(entries)


def purge_expired_entries(session: Session, limit: int = 10_000) -> int:
    """Delete up to `limit` expired entries, oldest first, through the `expires_at` index."""
    doomed = (select(ResponseCacheEntry.tenant_id, ResponseCacheEntry.key)
              .where(ResponseCacheEntry.expires_at <= func.now())
              .order_by(ResponseCacheEntry.expires_at).limit(limit).subquery())
    result = session.execute(delete(ResponseCacheEntry).where(
        ResponseCacheEntry.tenant_id == doomed.c.tenant_id, ResponseCacheEntry.key == doomed.c.key,
        ResponseCacheEntry.expires_at <= func.now()))
    return int(getattr(result, "rowcount", 0) or 0)


def purge_entries_created_before(session: Session, cutoff: datetime, limit: int) -> int:
    """Retention: delete up to `limit` live entries stored before `cutoff` (they hold an answer older than
    the bodies kept). With `cache.ttl_seconds` no longer than the retention (a config rule), only entries
    stored under a longer TTL are found; expired ones are `purge_expired_entries`' work. Reads the live
    entries (the `expires_at` index from now on): a cache bounded by its TTL, once per retention tick."""
    doomed = (select(ResponseCacheEntry.tenant_id, ResponseCacheEntry.key)
              .where(ResponseCacheEntry.expires_at > func.now(), ResponseCacheEntry.created_at < cutoff)
              .limit(limit).with_for_update(skip_locked=True).subquery())
    result = session.execute(delete(ResponseCacheEntry).where(
        ResponseCacheEntry.tenant_id == doomed.c.tenant_id, ResponseCacheEntry.key == doomed.c.key))
    return int(getattr(result, "rowcount", 0) or 0)
