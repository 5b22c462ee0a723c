"""Tenants and their API keys. Keys are random and long, so a SHA-256 digest is a safe store. A tenant may
hold several keys (one is made with the tenant); a revoked key keeps its row and is refused from then on.

Each tenant also has a webhook secret (`whsec_…`), the key that signs its jobs' `job.finished` webhooks.
It must be usable to sign, so it is stored encrypted with TIERBATCH_SECRET_KEY (tierbatch/base/secretbox.py), not
hashed; it is shown once, in the answer that creates the tenant or rotates the secret. Without a key
configured a tenant is created without one (None), and rotating is refused.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tierbatch.base.errors import Conflict, NotFound
from tierbatch.base.secretbox import ENV_NAME as SECRET_KEY_ENV
from tierbatch.base.secretbox import SecretBox
from tierbatch.db.models import ApiKey, Tenant
from tierbatch.webhooks.signing import new_secret

KEY_PREFIX = "tb_"
SHOWN_PREFIX_CHARS = 10  # kept and listed, to tell keys apart; the rest (43 random characters) is secret


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()  # any str, never an error


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class NewTenant:
    id: uuid.UUID
    name: str
    api_key: str  # shown once, never stored
    monthly_budget_usd: Decimal | None
    webhook_secret: str | None  # shown once here (stored encrypted: it signs the job webhooks)


def create_tenant(session: Session, name: str, monthly_budget_usd: Decimal | None = None, *,
                  box: SecretBox | None = None) -> NewTenant:
    api_key = new_api_key()
    webhook_secret = new_secret() if box is not None else None
    tenant = Tenant(id=uuid.uuid4(), name=name, monthly_budget_usd=monthly_budget_usd,
                    webhook_secret_encrypted=box.seal(webhook_secret) if box and webhook_secret else None)
    session.add(tenant)
    session.flush()
    _add_key(session, tenant.id, api_key)
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


# --- API keys ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NewKey:
    id: uuid.UUID
    api_key: str  # shown once, never stored
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a valid key grants: its tenant, and that tenant's rate limits (None: no limit)."""

    key_id: uuid.UUID
    tenant_id: uuid.UUID
    requests_per_minute: int | None
    tokens_per_minute: int | None


def _add_key(session: Session, tenant_id: uuid.UUID, api_key: str) -> ApiKey:
    row = ApiKey(id=uuid.uuid4(), tenant_id=tenant_id, key_hash=hash_api_key(api_key),
                 prefix=api_key[:SHOWN_PREFIX_CHARS])
    session.add(row)
    session.flush()
    return row


def _tenant_exists(session: Session, tenant_id: uuid.UUID) -> None:
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id}")


def create_api_key(session: Session, tenant_id: uuid.UUID) -> NewKey:
    _tenant_exists(session, tenant_id)
    api_key = new_api_key()
    row = _add_key(session, tenant_id, api_key)
    session.refresh(row, ["created_at"])
    return NewKey(row.id, api_key, row.created_at)


def list_api_keys(session: Session, tenant_id: uuid.UUID) -> list[ApiKey]:
    _tenant_exists(session, tenant_id)
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


def revoke_api_key(session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    """Revoke the key (idempotent: a key revoked before keeps its first revocation time)."""
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id)
                         .with_for_update())
    if row is None:
        raise NotFound(f"no key {key_id} for tenant {tenant_id}")
    if row.revoked_at is None:
        row.revoked_at = session.scalar(select(func.now()))
        session.flush()
    return row


def grant_for_key(session: Session, api_key: str) -> KeyGrant | None:
    """The grant of a key that exists and is not revoked, else None."""
    if not api_key:
        return None
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id, Tenant.requests_per_minute, Tenant.tokens_per_minute)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_api_key(api_key), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    return KeyGrant(*row) if row is not None else None


def tenant_for_key(session: Session, api_key: str) -> Tenant | None:
    """The tenant of a key that exists and is not revoked, else None."""
    if not api_key:
        return None
    return session.scalar(select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                          .where(ApiKey.key_hash == hash_api_key(api_key), ApiKey.revoked_at.is_(None)))


def list_tenants(session: Session, *, limit: int = 1000) -> list[Tenant]:
    """Every tenant by name (the operator's view)."""
    return list(session.scalars(select(Tenant).order_by(Tenant.name, Tenant.id).limit(limit)))
