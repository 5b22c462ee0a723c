"""Monthly budgets: a tenant's month-to-date spend (from `ledger_daily`) and unfinished tasks, and the
decision for its new tasks once the budget is reached (reject them, or downgrade complex to light).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, func, select
from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import BudgetExceeded
from tierbatch.base.states import TaskStatus, Tier
from tierbatch.costs.query import money_text
from tierbatch.db.models import LedgerDaily, Task, Tenant

LIVE_STATUSES = (TaskStatus.QUEUED, TaskStatus.WAITING_BATCH, TaskStatus.IN_BATCH, TaskStatus.RUNNING)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    budget: Decimal
    month_start: date
    spent: Decimal  # month to date (UTC month), priced rows, shadow calls included
    priced_requests: int
    pending_tasks: int  # queued, waiting_batch, in_batch, running
    pending_estimate: Decimal  # pending_tasks × this month's mean cost per priced request

    @property
    def committed(self) -> Decimal:
        return self.spent + self.pending_estimate

    @property
    def reached(self) -> bool:
        return self.committed >= self.budget

    def describe(self) -> str:
        text = f"spent ${money_text(self.spent)} of ${money_text(self.budget)} since {self.month_start.isoformat()}"
        if self.pending_tasks:
            text += (f", plus ~${money_text(self.pending_estimate.quantize(Decimal('0.000001')))} estimated "
                     f"for {self.pending_tasks} unfinished task(s)")
        return text


def budget_status(session: Session, tenant_id: uuid.UUID, budget: Decimal) -> BudgetStatus:
    """Month-to-date spend from `ledger_daily` (a few rows per day, by its (tenant_id, day, …) index),
    unfinished tasks from the partial index `ix_tasks_tenant_live`."""
    month_start = func.date_trunc("month", func.timezone("UTC", func.now())).cast(Date)
    row = session.execute(
        select(month_start.label("month_start"),
               func.coalesce(func.sum(LedgerDaily.cost_usd), 0).label("spent"),
               func.coalesce(func.sum(LedgerDaily.requests - LedgerDaily.unpriced_requests), 0).label("priced"))
        .select_from(LedgerDaily.__table__)
        .where(LedgerDaily.tenant_id == tenant_id, LedgerDaily.day >= month_start)
    ).one()
    pending = int(session.scalar(
        select(func.count()).select_from(Task.__table__)
        .where(Task.tenant_id == tenant_id, Task.status.in_(LIVE_STATUSES))
    ) or 0)
    spent, priced = Decimal(row.spent), int(row.priced)
    mean = spent / priced if priced else Decimal(0)
    return BudgetStatus(budget, row.month_start, spent, priced, pending, mean * pending)


def check_budget(session: Session, tenant_id: uuid.UUID, config: AppConfig) -> str | None:
    """The budget decision for new tasks of a tenant: None to accept them as they are; under policy
    `reject`, BudgetExceeded once the budget is reached; under `downgrade`, the `tier_reason` prefix
    to store complex tasks as light with. For every path that creates tasks (insert_tasks uses it)."""
    budget = session.scalar(select(Tenant.monthly_budget_usd).where(Tenant.id == tenant_id))
    if budget is None:
        return None
    status = budget_status(session, tenant_id, budget)
    if not status.reached:
        return None
    if config.budget.policy == "reject":
        raise BudgetExceeded(f"monthly budget reached: {status.describe()}; new tasks are refused until the "
                             "budget is raised or the month ends")
    return f"budget: monthly budget reached ({status.describe()}); complex downgraded to light"


def apply_budget(session: Session, tenant_id: uuid.UUID, rows: list[dict[str, Any]], config: AppConfig) -> None:
    """At task acceptance, on task rows about to be inserted: nothing without a budget or below it; at or
    over it, `reject` raises BudgetExceeded and `downgrade` stores complex rows as light, saying so in
    `tier_reason`."""
    if not rows:
        return
    reason = check_budget(session, tenant_id, config)
    if reason is None:
        return
    for row in rows:
        if row["tier"] is Tier.COMPLEX:
            row["tier"] = Tier.LIGHT
            row["tier_reason"] = f"{reason} (was: {row['tier_reason']})"
