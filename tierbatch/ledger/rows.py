"""Ledger rows: one per provider response, with unit prices and costs per token kind.

`usage_columns` is the one place a row's usage and price columns are spelled out; the ORM path here, the
gateway's group commit and batch ingestion's COPY all write what it gives. Each of the three counts the
money of its rows for the metrics once they are committed (`tierbatch.metrics.record`): here through the
session's commit, the gateway after its autocommit statement, ingestion from the statement's own tally.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.orm import Session

from tierbatch.base.states import Mode, Tier
from tierbatch.db.bulk_sql import LEDGER_USAGE_COLUMNS
from tierbatch.db.models import LedgerEntry
from tierbatch.ledger.pricing import PriceBook, PricedUsage, TokenUsage
from tierbatch.metrics.record import billed, charge


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


def usage_columns(usage: TokenUsage, priced: PricedUsage | None) -> dict[str, object]:
    """A ledger row's `bulk_sql.LEDGER_USAGE_COLUMNS`, in that order: tokens by kind, and (NULL when
    unpriced) unit prices, cost per kind and the batch discount the prices were derived with."""
    unit = priced.prices if priced is not None else None
    values: dict[str, object] = {
        "input_tokens": usage.input_tokens, "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens, "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "input_price": unit.input if unit else None,
        "cached_input_price": unit.cached_input if unit else None,
        "cache_write_price": unit.cache_write if unit else None,
        "output_price": unit.output if unit else None,
        "input_cost_usd": priced.input_cost if priced else None,
        "cached_input_cost_usd": priced.cached_input_cost if priced else None,
        "cache_write_cost_usd": priced.cache_write_cost if priced else None,
        "output_cost_usd": priced.output_cost if priced else None,
        "batch_discount": unit.batch_discount if unit else None,
    }
    return {name: values[name] for name in LEDGER_USAGE_COLUMNS}


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
        **usage_columns(record.usage, priced),
        cost_usd=cost, baseline_cost_usd=baseline, unpriced=cost is None,
        latency_ms=record.latency_ms,
    ))
    billed(session, charge(record.tenant_id, record.mode, cost, baseline))  # counted once the row commits
    return Charge(cost, baseline)
