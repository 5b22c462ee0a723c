"""Native task API: submit, read, list, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import ContextDep, GrantDep, SessionDep, TenantDep
from tierbatch.api.limits import TASKS_BODY_BYTES, parsed_json
from tierbatch.api.serialize import task_body
from tierbatch.base.errors import InvalidInput, NotFound, TooLarge
from tierbatch.base.inputs import NotJson, loads_checked
from tierbatch.base.messaging import DISPATCH_CHUNK, DISPATCH_TASKS, dispatch_after_commit
from tierbatch.base.states import TaskStatus
from tierbatch.db.models import Task
from tierbatch.routing.tiers import prompt_text
from tierbatch.tasks.store import AcceptedTask, cancel_task, get_task, insert_tasks, list_tasks
from tierbatch.tasks.submission import TaskSpec, parse_submission
from tierbatch.tenants.auth import estimated_tokens

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

def loads_body(raw: bytes) -> Any:
    try:
        return loads_checked(raw)
    except NotJson as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc.message}") from None


async def read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > TASKS_BODY_BYTES:
        raise TooLarge(f"the request body is over {TASKS_BODY_BYTES} bytes")
    return parsed_json(request, body, loads_body)


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} {value}") from None


def store_and_dispatch(ctx: ApiContext, tenant_id: uuid.UUID, specs: list[TaskSpec]) -> list[AcceptedTask]:
    with ctx.sessions.begin() as session:
        accepted = insert_tasks(session, tenant_id, specs, ctx.config)
    created = [str(a.id) for a in accepted if a.created]
    with dispatch_after_commit("new tasks"):
        for start in range(0, len(created), DISPATCH_CHUNK):
            # after commit: if the broker loses this, the reconciler dispatches the tasks again
            ctx.producer.send_task(DISPATCH_TASKS, args=[created[start:start + DISPATCH_CHUNK]])
    return accepted


def _prompt_bytes(spec: TaskSpec) -> int:
    """The prompt text's size, for the tokens-per-minute admission estimate."""
    if spec.prompt is not None:
        return len(spec.prompt.encode("utf-8", "surrogatepass"))
    text = prompt_text([message.model_dump() for message in spec.messages or []])
    return len(text.encode("utf-8", "surrogatepass"))


@router.post("", status_code=202)
async def submit_tasks(request: Request, tenant: TenantDep, grant: GrantDep, ctx: ContextDep) -> JSONResponse:
    payload = await read_json(request)
    limits = ctx.config.limits
    specs = parse_submission(payload, limits.max_tasks_per_request, limits.max_prompt_bytes)
    await ctx.rate_limits.admit_tokens(grant, estimated_tokens(sum(_prompt_bytes(spec) for spec in specs)))
    # database and broker calls are blocking: keep them off the event loop
    accepted = await run_in_threadpool(store_and_dispatch, ctx, tenant.id, specs)
    items = [{"id": str(a.id), "object": "task", "status": a.status.value, "tier": a.tier.value}
             for a in accepted]
    body: dict[str, Any] = items[0] if "tasks" not in payload else {"object": "list", "data": items}
    return JSONResponse(body, status_code=202)


@router.get("/{task_id}")
def read_task(task_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    return task_body(get_task(session, tenant.id, parse_uuid(task_id, "task")))


@router.get("")
def read_tasks(
    tenant: TenantDep, session: SessionDep,
    job_id: uuid.UUID | None = None, status: TaskStatus | None = None, task_type: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, after: str | None = None,
) -> dict[str, Any]:
    cursor = None
    if after is not None:
        anchor = session.get(Task, parse_uuid(after, "task"))
        if anchor is None or anchor.tenant_id != tenant.id:
            raise InvalidInput(f"after: no task {after}", param="after")
        cursor = (anchor.created_at, anchor.id)
    rows = list_tasks(session, tenant.id, limit=limit, after=cursor, job_id=job_id, status=status,
                      task_type=task_type)
    page, has_more = rows[:limit], len(rows) > limit
    return {"object": "list", "data": [task_body(t) for t in page], "has_more": has_more,
            "next": str(page[-1].id) if has_more else None}


@router.post("/{task_id}/cancel")
def cancel(task_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    return task_body(cancel_task(session, tenant.id, parse_uuid(task_id, "task")))
