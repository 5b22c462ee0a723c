"""Ledger rows: one per provider response, with unit prices and costs per token kind."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.orm import Session

from tierbatch.base.states import Mode, Tier
from tierbatch.db.models import LedgerEntry
from tierbatch.ledger.pricing import PriceBook, TokenUsage


@dataclass(frozen=True, slots=True)
class Charge:
    cost_usd: Decimal | None
    baseline_cost_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    tenant_id: uuid.UUID
    task_id: uuid.UUID
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    task_type: str
    tier: Tier
    mode: Mode
    provider: str
    requested_model: str
    served_model: str
    usage: TokenUsage
    latency_ms: int | None = None


def add_ledger_entry(session: Session, prices: PriceBook, record: ResponseRecord) -> Charge:
    """Price the response and add its ledger row to the session (the caller commits)."""
    priced = prices.price(record.provider, record.served_model, record.requested_model, record.usage,
                          batch=record.mode is Mode.BATCH)
    baseline = prices.baseline(record.usage)
    if record.mode is Mode.CACHE:
        cost: Decimal | None = Decimal(0)
    else:
        cost = priced.total if priced is not None else None
    session.add(LedgerEntry(
        tenant_id=record.tenant_id, task_id=record.task_id, job_id=record.job_id, batch_id=record.batch_id,
        task_type=record.task_type, tier=record.tier, mode=record.mode, provider=record.provider,
        requested_model=record.requested_model, served_model=record.served_model,
        input_tokens=record.usage.input_tokens, cached_tokens=record.usage.cached_tokens,
        output_tokens=record.usage.output_tokens, reasoning_tokens=record.usage.reasoning_tokens,
        input_price=priced.prices.input if priced else None,
        cached_input_price=priced.prices.cached_input if priced else None,
        output_price=priced.prices.output if priced else None,
        input_cost_usd=priced.input_cost if priced else None,
        cached_input_cost_usd=priced.cached_input_cost if priced else None,
        output_cost_usd=priced.output_cost if priced else None,
        cost_usd=cost, baseline_cost_usd=baseline, unpriced=cost is None,
        latency_ms=record.latency_ms,
    ))
    return Charge(cost, baseline)
