"""A tenant's routing rules and budget decision as the gateway applies them to its calls (`smart-select`
and the monthly budget), remembered for a few seconds."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session, sessionmaker

from tierbatch.base.config import AppConfig
from tierbatch.base.errors import BudgetExceeded
from tierbatch.base.flights import SingleFlight
from tierbatch.costs.budgets import check_budget
from tierbatch.routing.rules import RuleView, tenant_rules


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
        self._lookups: SingleFlight[uuid.UUID, TenantPolicy] = SingleFlight()

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
        self._lookups.forget()  # the next call looks again, whatever is in flight

    async def policy(self, tenant_id: uuid.UUID) -> TenantPolicy:
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return await self._lookups.run(tenant_id, lambda: self._look_up(tenant_id))

    async def _look_up(self, tenant_id: uuid.UUID) -> TenantPolicy:
        """One lookup per tenant however many calls wait for it (they all expire together)."""
        now = time.monotonic()
        found = await anyio.to_thread.run_sync(self._lookup, tenant_id)
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[tenant_id] = (now + self._ttl, found)
        return found
