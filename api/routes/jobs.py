"""Bulk jobs: submit up to 100,000 items per request, read counts and costs, stream results."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tierbatch.api.context import ApiContext
from tierbatch.api.deps import ContextDep, SessionDep, TenantDep
from tierbatch.api.downloads import content_disposition
from tierbatch.api.limits import JOBS_BODY_BYTES, NDJSON_TYPES, parsed_json
from tierbatch.api.routes.tasks import loads_body
from tierbatch.api.serialize import money, timestamp
from tierbatch.base.csv_safety import safe_cell
from tierbatch.base.errors import InvalidInput, InvalidValue, NotFound, Refused, TooLarge, UnsupportedMediaType
from tierbatch.base.inputs import NotJson, loads_checked
from tierbatch.base.messaging import ASSEMBLE_BATCHES, DISPATCH_TASKS, dispatch_after_commit
from tierbatch.base.states import TaskStatus
from tierbatch.db.models import Job, WebhookDelivery
from tierbatch.jobs.read import JobSummary, count_tasks, get_job, iter_results, label_of, list_jobs, summarize_jobs
from tierbatch.jobs.requests import JobRequest, parse_job_header, parse_job_request
from tierbatch.jobs.store import ItemAppender, cancel_job, dispatch_in_chunks, queued_ids_between, submit_job
from tierbatch.webhooks.delivery import JOBS, attempts_of
from tierbatch.webhooks.signing import require_secret_box

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_JOB_BODY_BYTES = JOBS_BODY_BYTES


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} {value}") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = TooLarge(f"the request body is over {limit} bytes; send the items in several requests with "
                           "the same name")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def webhook_body(job: Job, attempts: list[WebhookDelivery] | None = None) -> dict[str, Any] | None:
    """The job webhook's state: null until the job finished and was claimed (then pending, delivered, failed)."""
    if job.webhook_status is None:
        return None
    body: dict[str, Any] = {"status": job.webhook_status, "notified_at": timestamp(job.finished_notified_at)}
    if attempts is not None:
        body["attempts"] = [{"attempt": a.attempt, "status_code": a.status_code, "error": a.error,
                             "duration_ms": a.duration_ms, "created_at": timestamp(a.created_at)} for a in attempts]
    return body


def job_body(job: Job, summary: JobSummary, attempts: list[WebhookDelivery] | None = None) -> dict[str, Any]:
    spec = job.spec or {}
    return {
        "id": str(job.id), "object": "job", "name": job.name, "task_type": job.task_type,
        "tier": job.requested_tier.value, "urgent": job.urgent, "deadline": timestamp(job.deadline),
        "labels": spec.get("labels"), "metadata": spec.get("metadata") or {},
        "status": summary.status, "counts": summary.counts, "task_count": summary.task_count,
        "cost_usd": money(summary.cost_usd), "baseline_cost_usd": money(summary.baseline_cost_usd),
        "savings_usd": money(summary.savings_usd), "shadow_cost_usd": money(summary.shadow_cost_usd),
        "unpriced_requests": summary.unpriced_requests,
        "created_at": timestamp(job.created_at), "finished_at": timestamp(summary.finished_at),
        "webhook_url": job.webhook_url, "webhook": webhook_body(job, attempts),
    }


def _submit(ctx: ApiContext, tenant_id: uuid.UUID, payload: Any) -> dict[str, Any]:
    """Validate, store in one transaction, then dispatch in chunks (runs in a worker thread)."""
    request = parse_job_request(payload, ctx.config.limits.max_prompt_bytes)
    if request.webhook_url is not None:  # where it goes (DNS: this runs in a worker thread), and a key to sign
        ctx.webhook_targets.check_url(request.webhook_url)
        require_secret_box(ctx.secret_box)
    with ctx.sessions.begin() as session:
        submission = submit_job(session, tenant_id, request, ctx.config)
    # after commit: if this process dies here, the reconciler re-dispatches the stale queued tasks (and
    # beat's assembly tick finds the waiting ones)
    messages = 0
    with dispatch_after_commit("a job's tasks"):
        messages = dispatch_in_chunks(lambda name, ids: ctx.producer.send_task(name, args=[ids]),
                                      submission.queued_ids)
        if len(submission.queued_ids) < len(submission.task_ids):
            ctx.producer.send_task(ASSEMBLE_BATCHES)  # the size trigger, as routing sends it
    job = submission.job
    return {"id": str(job.id), "object": "job", "name": job.name, "created": submission.created,
            "status": "running", "items_added": len(submission.task_ids), "counts": submission.counts(),
            "task_count": submission.task_count, "dispatch_messages": messages, "webhook_url": job.webhook_url}


@router.post("", status_code=202)
async def submit(request: Request, tenant: TenantDep, ctx: ContextDep) -> JSONResponse:
    """A job from a JSON body (`items`: up to 100,000), or from an NDJSON body of any size, streamed: the
    job's fields on the first line, one item per line after it."""
    if content_type_of(request) in NDJSON_TYPES:
        def open_job(session: Session, max_bytes: int, header: JobRequest | None) -> ItemAppender:
            assert header is not None  # read from the first line
            return ItemAppender.for_request(session, tenant.id, header, ctx.config, max_bytes)

        return await _upload(request, ctx, open_job, with_header=True)
    body = await read_body(request, MAX_JOB_BODY_BYTES)
    payload = parsed_json(request, body, loads_body)
    answer = await run_in_threadpool(_submit, ctx, tenant.id, payload)
    return JSONResponse(answer, status_code=202)


@router.get("/{job_id}")
def read_job(job_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    job = get_job(session, tenant.id, parse_uuid(job_id, "job"))
    attempts = attempts_of(session, JOBS, [job.id])[job.id] if job.webhook_status is not None else None
    return job_body(job, summarize_jobs(session, [job.id])[job.id], attempts)


@router.get("")
def read_jobs(tenant: TenantDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              after: str | None = None) -> dict[str, Any]:
    cursor = None
    if after is not None:
        anchor = session.get(Job, parse_uuid(after, "job"))
        if anchor is None or anchor.tenant_id != tenant.id:
            raise InvalidInput(f"after: no job {after}", param="after")
        cursor = (anchor.created_at, anchor.id)
    rows = list_jobs(session, tenant.id, limit=limit, after=cursor)
    page, has_more = rows[:limit], len(rows) > limit
    summaries = summarize_jobs(session, [j.id for j in page])
    return {"object": "list", "data": [job_body(j, summaries[j.id]) for j in page], "has_more": has_more,
            "next": str(page[-1].id) if has_more else None}


@router.post("/{job_id}/cancel")
def cancel(job_id: str, tenant: TenantDep, ctx: ContextDep) -> dict[str, Any]:
    """Cancel every task of the job that has not started (queued, waiting_batch)."""
    parsed = parse_uuid(job_id, "job")
    with ctx.sessions.begin() as session:
        cancelled = cancel_job(session, tenant.id, parsed)
    with ctx.sessions() as session:
        job = get_job(session, tenant.id, parsed)
        return {**job_body(job, summarize_jobs(session, [job.id])[job.id]), "cancelled": cancelled}


NDJSON_CHUNK = 10_000  # items held in memory at a time (two chunks: one read while the other is written)
_ITEM_AT = re.compile(r"items\[(\d+)\]")


def content_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _with_line(error: Refused, lines: list[int], offset: int) -> Refused:
    """Say on which line of the upload the item an error names is."""
    match = _ITEM_AT.search(error.param or "")
    if match and 0 <= int(match.group(1)) - offset < len(lines):
        line = lines[int(match.group(1)) - offset]
        return error.reworded(f"line {line}: {error.message}")
    return error


def _parse_line(number: int, raw: bytes) -> Any:
    try:
        return loads_checked(raw)
    except NotJson as exc:
        raise InvalidInput(f"line {number}: not valid JSON ({exc.message})", param=None) from None
    except InvalidInput as exc:  # nesting, NUL: the line and the field inside it
        raise InvalidInput(f"line {number}: {exc.message}", param=exc.param) from None


async def ndjson_lines(request: Request, max_line: int) -> AsyncIterator[tuple[int, bytes]]:
    """The body's non-blank lines with their 1-based numbers, as they arrive; a line longer than
    `max_line` is refused as soon as that many bytes of it are in, naming it."""
    number = 0
    buffer = b""
    async for chunk in request.stream():
        buffer += chunk
        if b"\n" in chunk:
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                number += 1
                if raw.strip():
                    yield number, raw
        if len(buffer) > max_line:
            raise TooLarge(f"line {number + 1}: over {max_line} bytes")
    if buffer:
        number += 1
        if buffer.strip():
            yield number, buffer


def _add_chunk(appender: ItemAppender, numbers: list[int], raws: list[bytes]) -> None:
    """Parse, check and COPY one chunk of lines (on a worker thread: the event loop only reads)."""
    items = [_parse_line(number, raw) for number, raw in zip(numbers, raws, strict=True)]
    try:
        appender.add(items)
    except Refused as exc:
        raise _with_line(exc, numbers, appender.added) from None


OpenAppender = Callable[[Session, int, JobRequest | None], ItemAppender]


async def _upload(request: Request, ctx: ApiContext, open_appender: OpenAppender, *,
                  with_header: bool) -> JSONResponse:
    """Store an NDJSON body NDJSON_CHUNK items at a time in one transaction (all lines or none), then
    dispatch what was left queued. With `with_header`, the first line holds the job's fields."""
    max_bytes = ctx.config.limits.max_prompt_bytes
    max_line = 2 * max_bytes + 65_536
    session = ctx.sessions()
    writing: asyncio.Future[None] | None = None  # the chunk being written while the next one is read
    try:
        session.begin()
        header: JobRequest | None = None
        lines = ndjson_lines(request, max_line)
        if with_header:
            first = await anext(lines, None)
            if first is None:
                raise InvalidValue("the body is empty: the first line holds the job's fields, the items follow",
                                   param="items")
            try:
                header = parse_job_header(_parse_line(*first), max_bytes)
            except Refused as exc:
                raise exc.reworded(exc.message if exc.message.startswith("line ") else f"line {first[0]}: "
                                   f"{exc.message}") from None
            if header.webhook_url is not None:
                await run_in_threadpool(ctx.webhook_targets.check_url, header.webhook_url)
                require_secret_box(ctx.secret_box)
        appender = await run_in_threadpool(open_appender, session, max_bytes, header)
        numbers: list[int] = []
        raws: list[bytes] = []
        async for number, raw in lines:
            numbers.append(number)
            raws.append(raw)
            if len(raws) >= NDJSON_CHUNK:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(run_in_threadpool(_add_chunk, appender, numbers, raws))
                numbers, raws = [], []
        if writing is not None:
            await writing
        if raws:
            await run_in_threadpool(_add_chunk, appender, numbers, raws)
        if appender.added == 0:
            raise InvalidValue("items: the upload holds no items", param="items")
        await run_in_threadpool(session.commit)
        total = await run_in_threadpool(count_tasks, session, appender.job.id)
    except BaseException:
        if writing is not None and not writing.done():  # the session is not used by two threads at once
            with contextlib.suppress(BaseException):
                await writing
        await run_in_threadpool(session.rollback)
        raise
    finally:
        await run_in_threadpool(session.close)
    messages = await run_in_threadpool(_dispatch_upload, ctx, appender)
    job = appender.job
    return JSONResponse({"id": str(job.id), "object": "job", "name": job.name, "created": appender.created,
                         "status": "running", "items_added": appender.added, "counts": appender.counts(),
                         "task_count": total, "dispatch_messages": messages, "webhook_url": job.webhook_url},
                        status_code=202)


def _dispatch_upload(ctx: ApiContext, appender: ItemAppender) -> int:
    """Dispatch the upload's queued tasks in chunks, read back through a cursor (memory stays flat)."""
    if appender.first_id is None or appender.last_id is None:
        return 0
    messages = 0
    with dispatch_after_commit("uploaded job items"):
        if appender.queued:
            with ctx.sessions() as session, session.begin():
                for chunk in queued_ids_between(session, appender.job.id, appender.first_id, appender.last_id):
                    ctx.producer.send_task(DISPATCH_TASKS, args=[chunk])
                    messages += 1
        if appender.queued < appender.added:
            ctx.producer.send_task(ASSEMBLE_BATCHES)  # the size trigger, as routing sends it
    return messages


@router.post("/{job_id}/items", status_code=202)
async def upload_items(job_id: str, request: Request, tenant: TenantDep, ctx: ContextDep) -> JSONResponse:
    """Add items to a job from an NDJSON body (one {"id", "text"|"messages"} per line), streamed.

    The body is read and stored NDJSON_CHUNK items at a time in one transaction: all lines or none.
    """
    if content_type_of(request) not in NDJSON_TYPES:
        raise UnsupportedMediaType(f"send the items as application/x-ndjson, one item per line "
                                   f"(got {content_type_of(request)!r})")
    parsed_id = parse_uuid(job_id, "job")
    return await _upload(request, ctx, lambda session, max_bytes, _header: ItemAppender.for_job(
        session, tenant.id, parsed_id, ctx.config, max_bytes), with_header=False)


RESULT_FIELDS = ("item_id", "task_id", "status", "model", "cost_usd", "error")


@router.get("/{job_id}/results")
def results(job_id: str, tenant: TenantDep, ctx: ContextDep,
            result_format: Annotated[Literal["jsonl", "csv"], Query(alias="format")] = "jsonl"
            ) -> StreamingResponse:
    """One row per task in item order, streamed from a server-side cursor."""
    with ctx.sessions() as session:
        job = get_job(session, tenant.id, parse_uuid(job_id, "job"))
    spec_labels = (job.spec or {}).get("labels")
    labels = frozenset(spec_labels) if spec_labels is not None else None
    answer_field = "label" if labels is not None else "output"
    columns = (*RESULT_FIELDS[:3], answer_field, *RESULT_FIELDS[3:])

    def rows() -> Iterator[list[dict[str, Any]]]:
        with ctx.sessions() as session, session.begin():
            for partition in iter_results(session, job.id):
                out = []
                for r in partition:
                    error = r.error
                    if labels is not None:
                        answer = label_of(r.output, labels)
                        if answer is None and r.status == TaskStatus.SUCCEEDED and error is None:
                            error = "the answer is not one of the job's labels"
                    else:
                        answer = r.output
                    out.append({"item_id": r.item_id, "task_id": str(r.task_id), "status": r.status,
                                answer_field: answer, "model": r.model, "cost_usd": money(r.cost_usd),
                                "error": error})
                yield out

    def jsonl() -> Iterator[bytes]:
        for partition in rows():
            yield "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in partition).encode()

    def csv_lines() -> Iterator[bytes]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for partition in rows():
            # item ids, answers and errors come from tenants and providers: no cell may run as a formula
            writer.writerows({key: safe_cell(value) if isinstance(value, str) else value
                              for key, value in row.items()} for row in partition)
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue().encode()

    name = f"job-{job.id}.{result_format}"
    headers = {"Content-Disposition": content_disposition(name)}
    if result_format == "csv":
        return StreamingResponse(csv_lines(), media_type="text/csv; charset=utf-8", headers=headers)
    return StreamingResponse(jsonl(), media_type="application/x-ndjson", headers=headers)
