"""One-line recording calls for the domain: what a transaction moved or billed, counted after it commits
(`commit.after_commit`). Amounts arrive as Decimal and leave as float: Prometheus values are floats."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from tierbatch.metrics.catalog import BASELINE_USD, SPEND_USD, TASKS_FINISHED, UNPRICED_RESPONSES, mode_label
from tierbatch.metrics.commit import after_commit


@dataclass(frozen=True, slots=True)
class FinishedTasks:
    """How many tasks one statement moved to a terminal status, for one (status, tier, mode)."""

    status: object
    tier: object
    mode: object
    count: int = 1


@dataclass(frozen=True, slots=True)
class Billed:
    """Ledger rows of one tenant and mode: the sum of their costs and baselines (priced rows only) and how
    many had no price."""

    tenant_id: uuid.UUID | str
    mode: object
    cost_usd: Decimal | float = Decimal(0)
    baseline_usd: Decimal | float = Decimal(0)
    unpriced: int = 0


# Each counter's child for a set of labels, looked up once: `labels()` takes a lock and checks its
# arguments on every call, a few microseconds per call record on the gateway's hot path.
@functools.lru_cache(maxsize=8192)
def _finished(status: object, tier: object, mode: object) -> Any:
    return TASKS_FINISHED.labels(mode_label(status), mode_label(tier), mode_label(mode))


@functools.lru_cache(maxsize=8192)
def _billed(tenant_id: uuid.UUID | str, mode: object) -> tuple[Any, Any, Any]:
    tenant, label = str(tenant_id), mode_label(mode)
    return (UNPRICED_RESPONSES.labels(tenant, label), SPEND_USD.labels(tenant, label),
            BASELINE_USD.labels(tenant, label))


def count_finished(finished: Iterable[FinishedTasks]) -> None:
    """Increment now (the caller knows the rows are committed)."""
    for group in finished:
        if group.count:
            _finished(group.status, group.tier, group.mode).inc(group.count)


def count_billed(billed: Iterable[Billed]) -> None:
    """Increment now (the caller knows the rows are committed)."""
    for row in billed:
        unpriced, spend, baseline = _billed(row.tenant_id, row.mode)
        if row.unpriced:
            unpriced.inc(row.unpriced)
        if row.cost_usd:
            spend.inc(float(row.cost_usd))
        if row.baseline_usd:
            baseline.inc(float(row.baseline_usd))


def tasks_finished(session: Session, *finished: FinishedTasks) -> None:
    """Count terminal transitions once `session` commits."""
    if finished:
        after_commit(session, lambda: count_finished(finished))


def billed(session: Session, *rows: Billed) -> None:
    """Count ledger rows once `session` commits."""
    if rows:
        after_commit(session, lambda: count_billed(rows))


def charge(tenant_id: uuid.UUID | str, mode: object, cost_usd: Decimal | None,
           baseline_usd: Decimal | None) -> Billed:
    """One ledger row as a `Billed`: unpriced when it has no cost (its baseline is then not counted either,
    so baseline minus spend stays the savings of priced rows)."""
    if cost_usd is None:
        return Billed(tenant_id, mode, unpriced=1)
    return Billed(tenant_id, mode, cost_usd, baseline_usd or Decimal(0))
