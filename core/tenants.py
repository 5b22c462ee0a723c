"""Tenants and their API keys. Keys are random and long, so a SHA-256 digest is a safe store.

Each tenant also has a webhook secret (`whsec_…`), the key that signs its jobs' `job.finished` webhooks.
It must be usable to sign, so it is stored encrypted with TIERBATCH_SECRET_KEY (core/secretbox.py), not
hashed; it is shown once, in the answer that creates the tenant or rotates the secret. Without a key
configured a tenant is created without one (None), and rotating is refused.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from core.models import Tenant
from core.secretbox import ENV_NAME as SECRET_KEY_ENV
from core.secretbox import SecretBox
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
    webhook_secret: str | None  # shown once here (stored encrypted: it signs the job webhooks)


def create_tenant(session: Session, name: str, monthly_budget_usd: Decimal | None = None, *,
                  box: SecretBox | None = None) -> NewTenant:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    webhook_secret = new_secret() if box is not None else None
    tenant = Tenant(id=uuid.uuid4(), name=name, api_key_hash=hash_api_key(api_key),
                    api_key_prefix=api_key[:10], monthly_budget_usd=monthly_budget_usd,
                    webhook_secret_encrypted=box.seal(webhook_secret) if box and webhook_secret else None)
    session.add(tenant)
    session.flush()
    return NewTenant(tenant.id, name, api_key, monthly_budget_usd, webhook_secret)


@dataclass(frozen=True, slots=True)
class RotatedSecret:
    tenant: Tenant
    webhook_secret: str  # shown once


def rotate_webhook_secret(session: Session, tenant_id: uuid.UUID, box: SecretBox | None) -> RotatedSecret:
    """A new webhook secret for the tenant (shown once). Attempts made from now on, retries of earlier
    jobs' webhooks included, are signed with it."""
    tenant = session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    if box is None:
        raise Conflict(f"webhook secrets cannot be stored: {SECRET_KEY_ENV} is not set on the server")
    secret = new_secret()
    tenant.webhook_secret_encrypted = box.seal(secret)
    session.flush()
    return RotatedSecret(tenant, secret)


def tenant_for_key(session: Session, api_key: str) -> Tenant | None:
    if not api_key:
        return None
    return session.scalar(select(Tenant).where(Tenant.api_key_hash == hash_api_key(api_key)))
