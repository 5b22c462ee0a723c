"""Dashboard sessions in a real Redis: the token is not stored as such, the record expires after 8 hours,
closing it ends it, and an admin session ends when the admin token changes."""

from __future__ import annotations

import uuid

import anyio
import pytest
import redis.asyncio as aioredis

from tests.conftest import TEST_REDIS_URL
from tierbatch.tenants.sessions import SESSION_SECONDS, DashboardSessions

pytestmark = pytest.mark.integration


async def _scenario(prefix: str) -> None:
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    try:
        store = DashboardSessions(client, prefix)
        tenant_id, key_id = uuid.uuid4(), uuid.uuid4()
        token, opened = await store.open_for_tenant(tenant_id, key_id)
        keys = [key.decode() async for key in client.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 1 and token not in keys[0]  # stored under its digest
        raw = await client.get(keys[0])
        assert raw is not None and token.encode() not in raw
        assert 0 < await client.ttl(keys[0]) <= SESSION_SECONDS == 8 * 3600
        found = await store.find(token)
        assert found is not None and (found.tenant_id, found.key_id, found.csrf) == (tenant_id, key_id, opened.csrf)
        assert await store.find(keys[0].removeprefix(f"{prefix}tierbatch:dashboard:session:")) is None
        assert await store.find("x" * 500) is None
        await store.close(token)
        assert await store.find(token) is None

        admin_token = "a" * 40
        token, _ = await store.open_for_admin(admin_token)
        admin = await store.find(token)
        assert admin is not None and admin.admin
        assert admin.admin_token_matches(admin_token) and not admin.admin_token_matches("b" * 40)
        assert not admin.admin_token_matches("")
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def test_a_session_keeps_no_secret_and_ends() -> None:
    anyio.run(_scenario, f"tbtest-dash-{uuid.uuid4().hex[:8]}:")
