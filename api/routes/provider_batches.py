"""Provider batches: the batches the batch path sent to providers, newest first, with their timestamps and
the counts of their lines by outcome. A tenant sees the batches holding its tasks and counts only its own
lines; the operator (admin token) sees every batch with all its lines, or one tenant's view of them."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from tierbatch.api.deps import SessionDep, ViewerDep
from tierbatch.api.serialize import timestamp
from tierbatch.base.errors import InvalidInput, NotFound
from tierbatch.base.states import BatchStatus
from tierbatch.batching.read import (
    MAX_PAGE,
    ProviderBatchView,
    get_provider_batch,
    list_provider_batches,
    parse_cursor,
)

router = APIRouter(prefix="/v1/provider-batches", tags=["provider-batches"])


def provider_batch_body(view: ProviderBatchView) -> dict[str, Any]:
    counts = view.line_counts
    return {
        "id": str(view.id), "object": "provider_batch", "provider": view.provider, "model": view.model,
        "provider_batch_id": view.provider_batch_id, "status": view.status.value,
        "provider_status": view.provider_status.value if view.provider_status is not None else None,
        "request_count": view.request_count,
        "line_counts": {"succeeded": counts.succeeded, "failed": counts.failed, "pending": counts.pending,
                        "escalated": counts.escalated, "retried": counts.retried},
        "created_at": timestamp(view.created_at), "submitted_at": timestamp(view.submitted_at),
        "completed_at": timestamp(view.completed_at), "ingested_at": timestamp(view.ingested_at),
        "turnaround_seconds": view.turnaround_seconds, "error": view.error,
    }


def _batch_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no provider batch {value[:64]}", param="id") from None


def _scope(viewer_tenant: uuid.UUID | None, tenant_id: uuid.UUID | None) -> uuid.UUID | None:
    """Whose view: the tenant's own; the operator's, or with `tenant_id` the view that tenant has."""
    if viewer_tenant is None:
        return tenant_id
    if tenant_id is not None:  # refused whatever the value, so it tells nothing about other tenants
        raise InvalidInput("tenant_id: only the operator (admin token) may choose a tenant", param="tenant_id")
    return viewer_tenant


@router.get("")
def read_provider_batches(
    viewer: ViewerDep, session: SessionDep,
    status: BatchStatus | None = None, provider: str | None = None, model: str | None = None,
    tenant_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100, after: str | None = None,
) -> dict[str, Any]:
    views, next_cursor = list_provider_batches(
        session, tenant_id=_scope(viewer.tenant_id, tenant_id), status=status, provider=provider, model=model,
        limit=limit, after=parse_cursor(after) if after is not None else None)
    return {"object": "list", "data": [provider_batch_body(view) for view in views],
            "has_more": next_cursor is not None, "next": str(next_cursor) if next_cursor is not None else None}


@router.get("/{batch_id}")
def read_provider_batch(batch_id: str, viewer: ViewerDep, session: SessionDep,
                        tenant_id: uuid.UUID | None = None) -> dict[str, Any]:
    view = get_provider_batch(session, _batch_id(batch_id), tenant_id=_scope(viewer.tenant_id, tenant_id))
    return provider_batch_body(view)
