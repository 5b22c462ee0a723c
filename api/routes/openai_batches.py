"""The Batch API facade: `/v1/files` (purpose `batch`; also `user_data`, CSV or JSONL rows a
schedule's source reads by `file_id`) and `/v1/batches`, OpenAI's semantics
and limits over our task path. Domain logic in tierbatch/openai_batches/ (files.py, batches.py); output files are
assembled lazily, by the first read of a batch whose lines are all done (results.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tierbatch.api.context import ApiContext
from tierbatch.api.downloads import content_disposition
from tierbatch.api.limits import parsed_json
from tierbatch.api.routes.openai_chat import authenticate, context_of, parse_json
from tierbatch.base.errors import InvalidInput
from tierbatch.base.inputs import unstorable
from tierbatch.base.messaging import dispatch_after_commit
from tierbatch.jobs.store import dispatch_in_chunks
from tierbatch.openai_batches.batches import (
    batch_object,
    batch_view,
    cancel_batch,
    create_batch,
    get_batch,
    list_batches,
)
from tierbatch.openai_batches.files import (
    delete_file,
    file_object,
    get_file,
    iter_file_parts,
    list_files,
    store_batch_file,
    store_user_file,
)

router = APIRouter(tags=["openai"])

TenantId = Annotated[uuid.UUID, Depends(authenticate)]
Context = Annotated[ApiContext, Depends(context_of)]


def _missing(param: str) -> InvalidInput:
    return InvalidInput(f"Missing required parameter: '{param}'.", param,
                        "missing_required_parameter")


# --- files -----------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(request: Request, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("The request must be multipart/form-data with a 'file' and a 'purpose'.",
                           "file", None)
    async with request.form(max_files=1, max_fields=16) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose is None or purpose == "":
            raise _missing("purpose")
        if purpose not in ("batch", "user_data"):
            raise InvalidInput(f"Invalid value for 'purpose': '{purpose}'. tierbatch accepts 'batch' (Batch "
                               "API input) and 'user_data' (CSV or JSONL rows for a schedule's source).",
                               "purpose", "invalid_value")
        if not isinstance(upload, UploadFile):
            raise _missing("file")
        filename = upload.filename or ("upload.jsonl" if purpose == "batch" else "upload.csv")
        if unstorable(filename):
            raise InvalidInput("The file name holds a character that cannot be stored (NUL).",
                               "file", "invalid_value")

        def store() -> dict[str, Any]:
            with ctx.sessions.begin() as session:
                if purpose == "user_data":
                    stored = store_user_file(session, tenant_id, filename, upload.file, ctx.file_limits)
                else:
                    stored = store_batch_file(session, tenant_id, filename, upload.file, ctx.file_limits,
                                              ctx.config)
                return file_object(stored)

        return await run_in_threadpool(store)


@router.get("/v1/files")
def read_files(tenant_id: TenantId, ctx: Context, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
               order: str = "desc") -> dict[str, Any]:
    if order not in ("asc", "desc"):
        raise InvalidInput(f"Invalid value for 'order': '{order}'.", "order",
                           "invalid_value")
    with ctx.sessions() as session:
        rows, has_more = list_files(session, tenant_id, purpose=purpose, limit=limit, after=after,
                                    newest_first=order == "desc")
        data = [file_object(f) for f in rows]
    out: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        out["first_id"], out["last_id"] = data[0]["id"], data[-1]["id"]
    return out


@router.get("/v1/files/{file_id}")
def read_file(file_id: str, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    with ctx.sessions() as session:
        return file_object(get_file(session, tenant_id, file_id))


@router.get("/v1/files/{file_id}/content")
def read_file_content(file_id: str, tenant_id: TenantId, ctx: Context) -> StreamingResponse:
    with ctx.sessions() as session:
        stored = get_file(session, tenant_id, file_id)
        size, name = stored.bytes, stored.filename

    def parts() -> Iterator[bytes]:
        with ctx.sessions() as session:
            yield from iter_file_parts(session, file_id)

    return StreamingResponse(parts(), media_type="application/octet-stream", headers={
        "content-length": str(size), "content-disposition": content_disposition(name)})


@router.delete("/v1/files/{file_id}")
def remove_file(file_id: str, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    with ctx.sessions.begin() as session:
        return delete_file(session, tenant_id, file_id)


# --- batches -----------------------------------------------------------------------------------------


@router.post("/v1/batches")
async def create(request: Request, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    body = parsed_json(request, await request.body(), parse_json)

    def run() -> dict[str, Any]:
        with ctx.sessions.begin() as session:
            created = create_batch(session, tenant_id, body, ctx.config)
            answer = batch_object(created.batch)
        # after commit: the reconciler re-sends what the broker loses
        with dispatch_after_commit("a batch's tasks"):
            dispatch_in_chunks(lambda name, chunk: ctx.producer.send_task(name, args=[chunk]), created.task_ids)
        return answer

    return await run_in_threadpool(run)


@router.get("/v1/batches")
def read_batches(tenant_id: TenantId, ctx: Context, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                 after: str | None = None) -> dict[str, Any]:
    with ctx.sessions.begin() as session:
        rows, has_more = list_batches(session, tenant_id, limit=limit, after=after)
        data = [batch_view(session, batch) for batch in rows]
    out: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        out["first_id"], out["last_id"] = data[0]["id"], data[-1]["id"]
    return out


@router.get("/v1/batches/{batch_id}")
def read_batch(batch_id: str, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    with ctx.sessions.begin() as session:
        return batch_view(session, get_batch(session, tenant_id, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel(batch_id: str, tenant_id: TenantId, ctx: Context) -> dict[str, Any]:
    with ctx.sessions.begin() as session:
        batch = cancel_batch(session, tenant_id, batch_id)
    with ctx.sessions.begin() as session:
        return batch_view(session, get_batch(session, tenant_id, batch.id))
