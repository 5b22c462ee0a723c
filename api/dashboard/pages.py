"""The dashboard's routes: sign-in and sign-out, and one GET route per page.

Each page resolves its viewer (a session cookie or a bearer header; none: 303 to the sign-in page), then
builds its context in a worker thread from the domain's read modules (costs from `ledger_daily` through
tierbatch.costs.query, the same query as `GET /v1/costs`) and renders a template. A tenant sees its own
rows only; the admin sees every tenant, or one chosen with `?tenant=<id>`. An id of another tenant is the
404 page, as on the API.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.responses import RedirectResponse, Response

from tierbatch.api.context import ApiContext
from tierbatch.api.dashboard import views
from tierbatch.api.dashboard.auth import (
    COOKIE,
    Viewer,
    check_same_origin,
    current_viewer,
    read_form,
    sign_in,
)
from tierbatch.api.dashboard.render import PAGE_HEADERS, page
from tierbatch.api.deps import ContextDep
from tierbatch.api.downloads import content_disposition
from tierbatch.api.errors import status_of
from tierbatch.base.csv_safety import safe_cell
from tierbatch.base.errors import InvalidInput, NotFound, RateLimited, Refused, Unauthenticated
from tierbatch.base.states import Tier
from tierbatch.db.models import Tenant
from tierbatch.routing.rules import set_rule
from tierbatch.tenants.store import list_tenants

router = APIRouter(prefix="/dashboard", include_in_schema=False)

LOGIN = "/dashboard/login"
NAV = (("overview", "/dashboard", "Overview"), ("costs", "/dashboard/costs", "Costs"),
       ("jobs", "/dashboard/jobs", "Jobs"), ("batches", "/dashboard/batches", "Batches"),
       ("quality", "/dashboard/quality", "Quality"), ("schedules", "/dashboard/schedules", "Schedules"),
       ("limits", "/dashboard/limits", "Limits"))


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What a page's builder gets: who looks, which tenant's rows (None: every tenant, admin only)."""

    viewer: Viewer
    scope: uuid.UUID | None
    params: QueryParams
    ctx: ApiContext
    tenant_names: dict[uuid.UUID, str]


Builder = Callable[[Session, PageRequest], dict[str, Any]]


def _selected_tenant(session: Session, viewer: Viewer, params: QueryParams) -> uuid.UUID | None:
    """A tenant's own id; for the admin the `tenant` parameter, or None (every tenant)."""
    if not viewer.admin:
        return viewer.tenant_id
    text = params.get("tenant", "").strip()
    if not text:
        return None
    try:
        tenant_id = uuid.UUID(text)
    except ValueError:
        raise InvalidInput(f"tenant: {text!r} is not a tenant id", param="tenant") from None
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id}")
    return tenant_id


def _frame(viewer: Viewer | None, current: str, tenants: list[Tenant], selected: uuid.UUID | None
           ) -> dict[str, Any]:
    """What the layout needs: the nav bar, the admin's tenant select, the form token."""
    chosen = selected if viewer is not None and viewer.admin else None  # the admin's filter, kept in links
    return {"viewer": viewer, "nav": NAV, "current": current, "tenants": tenants,
            "selected": str(chosen) if chosen else "", "tq": f"?tenant={chosen}" if chosen else "",
            "csrf": viewer.csrf if viewer and viewer.csrf else "", "charts": []}


def _error_page(viewer: Viewer | None, exc: Refused | Unauthenticated | RateLimited) -> Response:
    status = status_of(exc)
    title = "Not found" if status == 404 else "Cannot show this page"
    context = {**_frame(viewer, "", [], None), "title": title, "message": str(exc), "status": status}
    return page("error.html", context, status=status)


async def _render(request: Request, ctx: ApiContext, current: str, template: str, build: Builder) -> Response:
    viewer = await current_viewer(request, ctx)
    if viewer is None:
        return RedirectResponse(LOGIN, status_code=303, headers=PAGE_HEADERS)

    def work() -> dict[str, Any]:
        with ctx.sessions() as session:
            tenants = list_tenants(session) if viewer.admin else []
            scope = _selected_tenant(session, viewer, request.query_params)
            names = {t.id: t.name for t in tenants}
            if viewer.tenant_id is not None and viewer.tenant_name is not None:
                names[viewer.tenant_id] = viewer.tenant_name
            context = _frame(viewer, current, tenants, scope)
            context.update(build(session, PageRequest(viewer, scope, request.query_params, ctx, names)))
            return context

    try:
        context = await run_in_threadpool(work)
    except Refused as exc:
        return _error_page(viewer, exc)
    return page(template, context)


# --- sign-in and sign-out ----------------------------------------------------------------------------

def _login_page(error: str | None = None, status: int = 200) -> Response:
    context = {**_frame(None, "", [], None), "error": error}
    return page("login.html", context, status=status)


@router.get("/login")
async def login_form() -> Response:
    return _login_page()


@router.post("/login")
async def login(request: Request, ctx: ContextDep) -> Response:
    try:
        check_same_origin(request)
        form = await read_form(request)
        token, _ = await sign_in(request, ctx, form.get("secret", "").strip())
    except (Unauthenticated, RateLimited) as exc:
        message = ("That is not a valid API key or admin token." if isinstance(exc, Unauthenticated)
                   else str(exc))
        return _login_page(message, status_of(exc))
    except Refused as exc:
        return _login_page(str(exc), status_of(exc))
    response = RedirectResponse("/dashboard", status_code=303, headers=PAGE_HEADERS)
    response.set_cookie(COOKIE, token, max_age=views.session_seconds(ctx), path="/dashboard", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request, ctx: ContextDep) -> Response:
    check_same_origin(request)
    form = await read_form(request)
    viewer = await current_viewer(request, ctx)
    if viewer is not None and viewer.session_token is not None:
        viewer.check_csrf(form.get("csrf"))
        await views.close_session(ctx, viewer.session_token)
    response = RedirectResponse(LOGIN, status_code=303, headers=PAGE_HEADERS)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


# --- pages ---------------------------------------------------------------------------------------------

@router.get("")
async def overview(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "overview", "overview.html", views.overview)


@router.get("/costs")
async def costs(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "costs", "costs.html", views.costs)


@router.get("/costs.csv")
async def costs_csv(request: Request, ctx: ContextDep) -> Response:
    viewer = await current_viewer(request, ctx)
    if viewer is None:
        return RedirectResponse(LOGIN, status_code=303, headers=PAGE_HEADERS)

    def work() -> str:
        with ctx.sessions() as session:
            scope = _selected_tenant(session, viewer, request.query_params)
            header, rows = views.cost_table(session, viewer, scope, request.query_params)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        for row in rows:
            writer.writerow([safe_cell(cell) for cell in row])  # task types and models are tenant strings
        return out.getvalue()

    try:
        text = await run_in_threadpool(work)
    except Refused as exc:
        return _error_page(viewer, exc)
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={**PAGE_HEADERS, "Content-Disposition": content_disposition(f"costs-{stamp}.csv")})


@router.get("/jobs")
async def jobs(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "jobs", "jobs.html", views.jobs)


def _id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} {value}") from None


@router.get("/jobs/{job_id}")
async def job(job_id: str, request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "jobs", "job.html",
                         lambda session, req: views.job(session, req, _id(job_id, "job")))


@router.get("/tasks/{task_id}")
async def task(task_id: str, request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "jobs", "task.html",
                         lambda session, req: views.task(session, req, _id(task_id, "task")))


@router.get("/batches")
async def batches(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "batches", "batches.html", views.batches)


@router.get("/quality")
async def quality(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "quality", "quality.html", views.quality)


@router.post("/quality/routes")
async def change_route(request: Request, ctx: ContextDep) -> Response:
    """Pin or unpin a task type's tier: the same change as `PUT /v1/routes/{task_type}`. Routes belong to
    a tenant, so only that tenant's own sign-in may change them (the admin reads them)."""
    viewer = await current_viewer(request, ctx)
    if viewer is None:
        return RedirectResponse(LOGIN, status_code=303, headers=PAGE_HEADERS)
    try:
        check_same_origin(request)
        form = await read_form(request)
        viewer.check_csrf(form.get("csrf"))
        tenant_id = viewer.tenant_id
        if tenant_id is None:
            raise InvalidInput("tenant: routes are a tenant's own; sign in with that tenant's key to change them",
                               param="tenant")
        task_type = form.get("task_type", "").strip()
        if not task_type or len(task_type) > 200:
            raise InvalidInput("task_type: give a task type of 1 to 200 characters", param="task_type")
        try:
            tier = Tier(form.get("tier", ""))
        except ValueError:
            raise InvalidInput(f"tier: use one of {', '.join(t.value for t in Tier)}", param="tier") from None
        pinned = form.get("pinned") == "true"

        def apply() -> None:
            with ctx.sessions.begin() as session:
                set_rule(session, tenant_id, task_type, tier, pinned, actor="dashboard", action="set",
                         reason=f"{'pinned' if pinned else 'unpinned'} on the dashboard", source="api")

        await run_in_threadpool(apply)
    except Refused as exc:
        return _error_page(viewer, exc)
    ctx.tenant_policies.forget(tenant_id)  # this process's smart-select sees the change at once
    return RedirectResponse("/dashboard/quality", status_code=303, headers=PAGE_HEADERS)


@router.get("/schedules")
async def schedules(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "schedules", "schedules.html", views.schedules)


@router.get("/limits")
async def limits(request: Request, ctx: ContextDep) -> Response:
    return await _render(request, ctx, "limits", "limits.html", views.limits)

