"""Liveness, readiness (database and broker reachable) and Prometheus metrics.

`/metrics` is open like any Prometheus endpoint, but a scrape without the admin token has the `tenant` label
summed away: spend per tenant is for the operator. `[metrics] require_admin = true` closes it to all
but the admin token. It serves every process's series under `PROMETHEUS_MULTIPROC_DIR` (tierbatch/metrics/exposition.py)
and, from this process alone, the gauges read at scrape time (tierbatch/metrics/live.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import ContextDep, require_admin
from tierbatch.metrics.exposition import render
from tierbatch.metrics.live import LiveCollector, read_snapshot

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ctx: ContextDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, don't raise: this endpoint exists to say what is down
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(ctx.settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        checks["broker"] = "ok"
    except redis.RedisError as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503, headers=None if ready else {"retry-after": "2"})


async def _cooling(ctx: ApiContext) -> dict[tuple[str, str], bool] | None:
    """Which configured models cool down now (one MGET), or None when Redis does not answer in time."""
    try:
        return await asyncio.wait_for(ctx.gateway.cooldown.cooling(ctx.config.configured_models()),
                                      ctx.config.metrics.scrape_timeout_seconds)
    except (redis.RedisError, TimeoutError, OSError):
        return None


@router.get("/metrics")
async def metrics(request: Request, ctx: ContextDep) -> Response:
    # a token that is sent must be the admin's (else 401): a wrong one is not quietly served less
    per_tenant = ctx.config.metrics.require_admin or "authorization" in request.headers
    if per_tenant:
        await require_admin(request, ctx)
    cooling = await _cooling(ctx)
    batch_models = [ref for ref in ctx.config.configured_models() if ctx.config.provider(ref.provider).batch]

    def scrape() -> bytes:
        snapshot = read_snapshot(ctx.engine, ctx.config.metrics.scrape_timeout_seconds, batch_models, cooling)
        return render(LiveCollector(snapshot), per_tenant=per_tenant)

    return Response(await run_in_threadpool(scrape), media_type=CONTENT_TYPE_LATEST)
