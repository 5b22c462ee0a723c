"""Tenants and their API keys. Keys are random and long, so a SHA-256 digest is a safe store."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Tenant

KEY_PREFIX = "tb_"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewTenant:
    id: uuid.UUID
    name: str
    api_key: str  # shown once, never stored
    monthly_budget_usd: Decimal | None


def create_tenant(session: Session, name: str, monthly_budget_usd: Decimal | None = None) -> NewTenant:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    tenant = Tenant(id=uuid.uuid4(), name=name, api_key_hash=hash_api_key(api_key),
                    api_key_prefix=api_key[:10], monthly_budget_usd=monthly_budget_usd)
    session.add(tenant)
    session.flush()
    return NewTenant(tenant.id, name, api_key, monthly_budget_usd)


def tenant_for_key(session: Session, api_key: str) -> Tenant | None:
    if not api_key:
        return None
    return session.scalar(select(Tenant).where(Tenant.api_key_hash == hash_api_key(api_key)))
