"""Tenants and their API keys. Keys are random and long, so a SHA-256 digest is a safe store.

Each tenant also has a webhook secret, the HMAC key that signs its jobs' `job.finished` webhooks. It
must be usable to sign, so it is stored as is (like a schedule's secret); it is shown once, in the
answer that creates the tenant or rotates the secret.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.models import Tenant
from core.webhooks import new_secret

KEY_PREFIX = "tb_"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewTenant:
    id: uuid.UUID
    name: str
    api_key: str  # shown once, never stored
    monthly_budget_usd: Decimal | None
    webhook_secret: str  # shown once here (stored: it signs the job webhooks)


def create_tenant(session: Session, name: str, monthly_budget_usd: Decimal | None = None) -> NewTenant:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    tenant = Tenant(id=uuid.uuid4(), name=name, api_key_hash=hash_api_key(api_key),
                    api_key_prefix=api_key[:10], monthly_budget_usd=monthly_budget_usd, webhook_secret=new_secret())
    session.add(tenant)
    session.flush()
    return NewTenant(tenant.id, name, api_key, monthly_budget_usd, tenant.webhook_secret)


def rotate_webhook_secret(session: Session, tenant_id: uuid.UUID) -> Tenant:
    """A new webhook secret for the tenant (on the returned row, to show once). Attempts made from now on,
    retries of earlier jobs' webhooks included, are signed with it."""
    tenant = session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    tenant.webhook_secret = new_secret()
    session.flush()
    return tenant


def tenant_for_key(session: Session, api_key: str) -> Tenant | None:
    if not api_key:
        return None
    return session.scalar(select(Tenant).where(Tenant.api_key_hash == hash_api_key(api_key)))
