"""`/v1/batches`: create, retrieve, list (newest first, `after`/`limit`/`has_more`), cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from tierbatch.providers import openai_validation
from tierbatch.simulator.batch_input import count_lines
from tierbatch.simulator.batch_lifecycle import run_batch
from tierbatch.simulator.errors import OpenAIError, bad_request, not_found, parse_json_body
from tierbatch.simulator.state import sim_state

SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)
OPENAI_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                    "/v1/moderations")
CANCELLABLE = ("validating", "in_progress")


def _missing(param: str) -> OpenAIError:
    return OpenAIError(400, f"Missing required parameter: '{param}'.", "invalid_request_error", param,
                       "missing_required_parameter")


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    try:
        return openai_validation.check_batch_metadata(metadata, ellipsis="...")
    except openai_validation.InvalidRequest as refused:
        raise bad_request(refused.message, refused.param, refused.code) from None


async def create_batch(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    body = parse_json_body(await request.body())
    if not isinstance(body, dict):
        raise bad_request("Invalid type for request body: expected an object.", None, "invalid_type")
    input_file_id = body.get("input_file_id")
    endpoint = body.get("endpoint")
    window = body.get("completion_window")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise _missing("input_file_id")
    if not isinstance(endpoint, str) or not endpoint:
        raise _missing("endpoint")
    if endpoint not in SUPPORTED_ENDPOINTS:
        known = endpoint in OPENAI_ENDPOINTS
        detail = "is not supported by the simulator" if known else "is not a batch endpoint"
        raise bad_request(f"Invalid value for 'endpoint': '{endpoint}' {detail}. Supported values are: "
                          "'/v1/chat/completions'.", "endpoint", "invalid_value")
    if window is None:
        raise _missing("completion_window")
    if window != "24h":
        raise bad_request(f"Invalid value for 'completion_window': '{window}'. Supported values are: '24h'.",
                          "completion_window", "invalid_value")
    metadata = _check_metadata(body.get("metadata"))
    stored = state.files.get(input_file_id)
    if stored is None:
        raise not_found("File", input_file_id, "input_file_id")
    if stored.purpose != "batch":
        raise bad_request(f"The file {input_file_id} has purpose '{stored.purpose}'; a batch needs a file "
                          "uploaded with purpose 'batch'.", "input_file_id", "invalid_file_purpose")
    line_count = await asyncio.to_thread(count_lines, stored.path)
    batch = state.batches.create(input_file_id, endpoint, "24h", metadata, line_count)
    state.stats.batches_created += 1
    state.stats.batch_lines += line_count
    state.spawn(run_batch(state, batch))
    return batch.as_dict()


async def retrieve_batch(request: Request, batch_id: str) -> dict[str, Any]:
    batch = sim_state(request).batches.get(batch_id)
    if batch is None:
        raise not_found("Batch", batch_id, "batch_id")
    return batch.as_dict()


async def list_batches(request: Request) -> dict[str, Any]:
    params = request.query_params
    after = params.get("after") or None
    raw_limit = params.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise bad_request(f"Invalid 'limit': expected an integer, got '{raw_limit}'.", "limit",
                          "invalid_type") from None
    if not 1 <= limit <= 100:
        raise bad_request(f"Invalid 'limit': expected a value between 1 and 100, got {limit}.", "limit",
                          "invalid_value")
    try:
        page, has_more = sim_state(request).batches.page(after, limit)
    except KeyError:
        raise bad_request(f"Invalid 'after': no batch with id '{after}'.", "after", "invalid_value") from None
    data = [b.as_dict() for b in page]
    out: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        out["first_id"] = data[0]["id"]
        out["last_id"] = data[-1]["id"]
    return out


async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    batch = sim_state(request).batches.get(batch_id)
    if batch is None:
        raise not_found("Batch", batch_id, "batch_id")
    if batch.status in CANCELLABLE:
        batch.cancel_requested_at = time.monotonic()
        batch.stamp("cancelling")
        batch.cancel_event.set()
    elif batch.status not in ("cancelling", "cancelled"):
        raise OpenAIError(409, f"Cannot cancel a batch with status '{batch.status}'.",
                          "invalid_request_error", None, None)
    return batch.as_dict()


def batches_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/batches", create_batch, methods=["POST"])
    router.add_api_route("/v1/batches", list_batches, methods=["GET"])
    router.add_api_route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"])
    router.add_api_route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"])
    return router
