"""Scheduled bulk classification: CRUD, run now, runs and their classifications."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from tierbatch.api.deps import ContextDep, SessionDep, TenantDep
from tierbatch.api.limits import parsed_json
from tierbatch.api.routes.tasks import loads_body
from tierbatch.api.serialize import money, timestamp
from tierbatch.base.errors import InvalidInput, NotFound
from tierbatch.base.messaging import SCHEDULE_RUN
from tierbatch.db.models import Classification, Schedule, ScheduleRun, Tenant
from tierbatch.schedules.file_sources import user_file
from tierbatch.schedules.firing import request_run
from tierbatch.schedules.run_webhooks import run_summary, webhook_attempts
from tierbatch.schedules.spec import TenantScope, parse_schedule
from tierbatch.schedules.sql_sources import cursor_json
from tierbatch.schedules.store import (
    create_schedule,
    delete_schedule,
    get_run,
    get_schedule,
    list_runs,
    list_schedules,
    update_schedule,
)
from tierbatch.webhooks.signing import require_secret_box

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} {value}") from None


async def json_body(request: Request) -> Any:
    return parsed_json(request, await request.body(), loads_body)


def tenant_scope(session: Session, tenant: Tenant) -> TenantScope:
    """What the schedule checks need to know of the caller: id, name, and its own uploaded files."""
    return TenantScope(tenant.id, tenant.name, lambda file_id: user_file(session, tenant.id, file_id) is not None)


def schedule_body(schedule: Schedule) -> dict[str, Any]:
    return {
        "id": str(schedule.id), "object": "schedule", "name": schedule.name, "cron": schedule.cron,
        "timezone": schedule.timezone, "enabled": schedule.enabled, "job": schedule.job, "source": schedule.source,
        "sink": schedule.sink, "webhook_url": schedule.webhook_url, "cursor": cursor_json(schedule.cursor),
        "next_fire_at": timestamp(schedule.next_fire_at), "last_fire_at": timestamp(schedule.last_fire_at),
        "created_at": timestamp(schedule.created_at), "updated_at": timestamp(schedule.updated_at),
    }


def run_body(run: ScheduleRun, attempts: list[Any] | None = None) -> dict[str, Any]:
    body = run_summary(run)
    body["webhook"] = None if run.webhook_status is None else {
        "status": run.webhook_status,
        "attempts": [{"attempt": a.attempt, "status_code": a.status_code, "error": a.error,
                      "duration_ms": a.duration_ms, "created_at": timestamp(a.created_at)} for a in attempts or []],
    }
    return body


def _schedule_cursor(session: SessionDep, after: str | None, tenant_id: uuid.UUID
                     ) -> tuple[datetime, uuid.UUID] | None:
    if after is None:
        return None
    anchor = session.get(Schedule, parse_uuid(after, "schedule"))
    if anchor is None or anchor.tenant_id != tenant_id:
        raise InvalidInput(f"after: no schedule {after}", param="after")
    return anchor.created_at, anchor.id


def _run_cursor(session: SessionDep, after: str | None, schedule_id: uuid.UUID) -> tuple[datetime, uuid.UUID] | None:
    if after is None:
        return None
    anchor = session.get(ScheduleRun, parse_uuid(after, "run"))
    if anchor is None or anchor.schedule_id != schedule_id:
        raise InvalidInput(f"after: no run {after} of this schedule", param="after")
    return anchor.created_at, anchor.id


async def check_webhook_target(ctx: ContextDep, payload: Any) -> None:
    """A given `webhook_url` must go to a public address (422 naming it), checked before the rest of the
    body; the DNS lookup runs off the event loop."""
    if isinstance(payload, dict) and payload.get("webhook_url") is not None:
        await run_in_threadpool(ctx.webhook_targets.check_url, payload["webhook_url"])
        require_secret_box(ctx.secret_box)


@router.post("", status_code=201)
async def create(request: Request, tenant: TenantDep, ctx: ContextDep) -> JSONResponse:
    payload = await json_body(request)
    await check_webhook_target(ctx, payload)
    with ctx.sessions.begin() as session:
        spec = parse_schedule(payload, ctx.config, tenant_scope(session, tenant))
        schedule, secret = create_schedule(session, tenant.id, spec, box=ctx.secret_box)
        body = schedule_body(schedule)
    # the signing secret is shown once, here; it is never returned again
    return JSONResponse({**body, "webhook_secret": secret}, status_code=201)


@router.get("")
def read_all(tenant: TenantDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
             after: str | None = None) -> dict[str, Any]:
    rows = list_schedules(session, tenant.id, limit=limit, after=_schedule_cursor(session, after, tenant.id))
    page, has_more = rows[:limit], len(rows) > limit
    return {"object": "list", "data": [schedule_body(s) for s in page], "has_more": has_more,
            "next": str(page[-1].id) if has_more else None}


@router.get("/{schedule_id}")
def read_one(schedule_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    return schedule_body(get_schedule(session, tenant.id, parse_uuid(schedule_id, "schedule")))


@router.patch("/{schedule_id}")
async def change(schedule_id: str, request: Request, tenant: TenantDep, ctx: ContextDep) -> dict[str, Any]:
    parsed = parse_uuid(schedule_id, "schedule")
    payload = await json_body(request)
    await check_webhook_target(ctx, payload)
    with ctx.sessions.begin() as session:
        schedule = update_schedule(session, tenant.id, parsed, payload, ctx.config,
                                   tenant_scope(session, tenant))
        return schedule_body(schedule)


@router.delete("/{schedule_id}")
def remove(schedule_id: str, tenant: TenantDep, ctx: ContextDep) -> dict[str, Any]:
    parsed = parse_uuid(schedule_id, "schedule")
    with ctx.sessions.begin() as session:  # committed before the answer
        delete_schedule(session, tenant.id, parsed)
    return {"id": str(parsed), "object": "schedule", "deleted": True}


@router.post("/{schedule_id}/run", status_code=202)
def run_now(schedule_id: str, tenant: TenantDep, ctx: ContextDep) -> JSONResponse:
    parsed = parse_uuid(schedule_id, "schedule")
    with ctx.sessions.begin() as session:
        run = request_run(session, tenant.id, parsed)
        body = run_body(run)
    # after commit; a lost message is sent again by the beat tick
    ctx.producer.send_task(SCHEDULE_RUN, args=[body["id"]])
    return JSONResponse(body, status_code=202)


@router.get("/{schedule_id}/runs")
def runs(schedule_id: str, tenant: TenantDep, session: SessionDep,
         limit: Annotated[int, Query(ge=1, le=1000)] = 100, after: str | None = None) -> dict[str, Any]:
    schedule = get_schedule(session, tenant.id, parse_uuid(schedule_id, "schedule"))
    rows = list_runs(session, schedule.id, limit=limit, after=_run_cursor(session, after, schedule.id))
    page, has_more = rows[:limit], len(rows) > limit
    attempts = webhook_attempts(session, [r.id for r in page])
    return {"object": "list", "data": [run_body(r, attempts[r.id]) for r in page], "has_more": has_more,
            "next": str(page[-1].id) if has_more else None}


@router.get("/{schedule_id}/runs/{run_id}")
def run_detail(schedule_id: str, run_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    schedule = get_schedule(session, tenant.id, parse_uuid(schedule_id, "schedule"))
    run = get_run(session, schedule, parse_uuid(run_id, "run"))
    return run_body(run, webhook_attempts(session, [run.id])[run.id])


@router.get("/{schedule_id}/runs/{run_id}/classifications")
def classifications(schedule_id: str, run_id: str, tenant: TenantDep, session: SessionDep,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                    after: Annotated[int | None, Query(ge=0)] = None) -> dict[str, Any]:
    """The run's items in source order: label (or output), status, model, cost; paged by `after` = `next`."""
    schedule = get_schedule(session, tenant.id, parse_uuid(schedule_id, "schedule"))
    run = get_run(session, schedule, parse_uuid(run_id, "run"))
    query = select(Classification).where(Classification.run_id == run.id)
    if after is not None:
        query = query.where(Classification.id > after)
    rows = list(session.scalars(query.order_by(Classification.id).limit(limit + 1)))
    page, has_more = rows[:limit], len(rows) > limit
    data = [{"item_id": c.item_id, "status": c.status, "label": c.label, "output": c.output, "model": c.model,
             "cost_usd": money(c.cost_usd), "error": c.error, "task_id": str(c.task_id) if c.task_id else None,
             "classified_at": timestamp(c.classified_at)} for c in page]
    return {"object": "list", "data": data, "has_more": has_more, "next": str(page[-1].id) if has_more else None}
