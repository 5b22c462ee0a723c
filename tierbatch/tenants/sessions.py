"""Dashboard sign-in sessions: a random token in an HttpOnly cookie, its record in Redis.

The cookie holds only the token; Redis keeps its SHA-256 digest as the key (a copy of Redis gives no usable
cookie) with the record: who signed in (a tenant's key id, or the admin), a CSRF token for the session's
forms, and the expiry (the key's TTL). Losing Redis signs everyone out, nothing more.

A tenant's session keeps the id of the key it was opened with, and every use checks that key is still
unrevoked in Postgres (`key_is_live`): revoking a key ends the sessions opened with it at once. An admin
session keeps a digest of the admin token it was opened with, so changing the token ends them too.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.orm import Session

from tierbatch.db.models import ApiKey

SESSION_SECONDS = 8 * 3600


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class SignIn:
    """Who a session belongs to: a tenant (through one of its keys), or the admin (tenant_id None)."""

    tenant_id: uuid.UUID | None
    key_id: uuid.UUID | None
    admin_digest: str | None  # the admin token's digest when it was opened
    csrf: str

    @property
    def admin(self) -> bool:
        return self.tenant_id is None

    def admin_token_matches(self, admin_token: str) -> bool:
        return bool(admin_token) and self.admin_digest is not None and secrets.compare_digest(
            self.admin_digest, _digest(admin_token))


class DashboardSessions:
    def __init__(self, redis_client: aioredis.Redis, key_prefix: str, ttl_seconds: int = SESSION_SECONDS) -> None:
        self._redis = redis_client
        self._prefix = f"{key_prefix}tierbatch:dashboard:session:"
        self.ttl_seconds = ttl_seconds

    def _key(self, token: str) -> str:
        return self._prefix + _digest(token)

    async def open_for_tenant(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> tuple[str, SignIn]:
        return await self._open(SignIn(tenant_id, key_id, None, secrets.token_urlsafe(32)))

    async def open_for_admin(self, admin_token: str) -> tuple[str, SignIn]:
        return await self._open(SignIn(None, None, _digest(admin_token), secrets.token_urlsafe(32)))

    async def _open(self, sign_in: SignIn) -> tuple[str, SignIn]:
        token = secrets.token_urlsafe(32)
        record = {"tenant_id": str(sign_in.tenant_id) if sign_in.tenant_id else None,
                  "key_id": str(sign_in.key_id) if sign_in.key_id else None,
                  "admin_digest": sign_in.admin_digest, "csrf": sign_in.csrf}
        await self._redis.set(self._key(token), json.dumps(record), ex=self.ttl_seconds)
        return token, sign_in

    async def find(self, token: str) -> SignIn | None:
        """The session of a cookie's token, or None (unknown, expired, or not a token of ours)."""
        if not token or len(token) > 128:
            return None
        raw = await self._redis.get(self._key(token))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            return SignIn(uuid.UUID(record["tenant_id"]) if record["tenant_id"] else None,
                          uuid.UUID(record["key_id"]) if record["key_id"] else None,
                          record["admin_digest"], record["csrf"])
        except (ValueError, KeyError, TypeError):
            return None

    async def close(self, token: str) -> None:
        await self._redis.delete(self._key(token))


def key_is_live(session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> bool:
    """The key exists, belongs to the tenant and is not revoked."""
    return session.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id,
                                                 ApiKey.revoked_at.is_(None))) is not None
