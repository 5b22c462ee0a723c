"""`/v1/messages/batches`: create (inline `requests`), retrieve, results (JSONL), cancel, list, delete.

The list is newest first with Anthropic's paging (`limit` 1..1000, `after_id` / `before_id`; the page
has `data`, `has_more`, `first_id`, `last_id`). Results exist once the batch has ended; before that
they are a 404, as is any unknown id. A batch can be deleted once it has ended.
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tierbatch.simulator.anthropic_errors import AnthropicError, invalid_request, parse_anthropic_json
from tierbatch.simulator.message_batch_lifecycle import run_message_batch
from tierbatch.simulator.message_batch_store import BatchRequest, MessageBatchRecord
from tierbatch.simulator.state import sim_state

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _base_url(request: Request) -> str:
    return str(request.base_url)


def _require(request: Request, batch_id: str) -> MessageBatchRecord:
    batch = sim_state(request).message_batches.get(batch_id)
    if batch is None:
        raise AnthropicError("not_found_error", f"No message batch with id '{batch_id}' was found.")
    return batch


def _requests(body: Any, max_requests: int) -> list[BatchRequest]:
    if not isinstance(body, dict):
        raise invalid_request("Input should be a valid dictionary or object")
    requests = body.get("requests")
    if requests is None:
        raise invalid_request("requests: Field required")
    if not isinstance(requests, list):
        raise invalid_request("requests: Input should be a valid list")
    if not requests:
        raise invalid_request("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > max_requests:
        raise invalid_request(f"requests: List should have at most {max_requests} items after validation, "
                              f"not {len(requests)}")
    out: list[BatchRequest] = []
    seen: set[str] = set()
    for index, item in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(item, dict):
            raise invalid_request(f"{where}: Input should be a valid dictionary or object")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str):
            raise invalid_request(f"{where}.custom_id: Field required")
        if not CUSTOM_ID.match(custom_id):
            raise invalid_request(f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        if custom_id in seen:
            raise invalid_request(f"Duplicate custom_id '{custom_id}': each request in a batch needs a unique "
                                  "custom_id.")
        seen.add(custom_id)
        params = item.get("params")
        if not isinstance(params, dict):
            raise invalid_request(f"{where}.params: Field required")
        out.append(BatchRequest(custom_id, params))
    return out


async def create_message_batch(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    requests = _requests(parse_anthropic_json(await request.body()), state.config.batch.max_lines)
    batch = state.message_batches.create(requests)
    state.stats.message_batches_created += 1
    state.stats.message_batch_requests += len(requests)
    state.spawn(run_message_batch(state, batch))
    return batch.as_dict(_base_url(request))


async def retrieve_message_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return _require(request, batch_id).as_dict(_base_url(request))


async def message_batch_results(request: Request, batch_id: str) -> Response:
    batch = _require(request, batch_id)
    if batch.processing_status != "ended" or batch.results is None:
        raise AnthropicError("not_found_error", f"Results for message batch '{batch_id}' are not available yet: "
                             "the batch has not ended.")
    return Response(batch.results, media_type="application/x-jsonl",
                    headers={"content-disposition": f'attachment; filename="{batch_id}_results.jsonl"'})


async def cancel_message_batch(request: Request, batch_id: str) -> dict[str, Any]:
    batch = _require(request, batch_id)
    if batch.processing_status == "in_progress":
        batch.processing_status = "canceling"
        batch.cancel_initiated_at = time.time()
        batch.cancel_event.set()
    elif batch.processing_status == "ended":
        raise invalid_request(f"Message batch '{batch_id}' has already ended and cannot be canceled.")
    return batch.as_dict(_base_url(request))


async def delete_message_batch(request: Request, batch_id: str) -> dict[str, Any]:
    batch = _require(request, batch_id)
    if batch.processing_status != "ended":
        raise invalid_request(f"Message batch '{batch_id}' is still {batch.processing_status}; cancel it and wait "
                              "for it to end before deleting it.")
    sim_state(request).message_batches.delete(batch_id)
    return {"id": batch_id, "type": "message_batch_deleted"}


async def list_message_batches(request: Request) -> dict[str, Any]:
    params = request.query_params
    raw_limit = params.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise invalid_request(f"limit: Input should be a valid integer, unable to parse string as an integer "
                              f"('{raw_limit}')") from None
    if not 1 <= limit <= 1000:
        raise invalid_request("limit: Input should be between 1 and 1000")
    after_id, before_id = params.get("after_id") or None, params.get("before_id") or None
    if after_id and before_id:
        raise invalid_request("Only one of 'after_id' and 'before_id' may be given.")
    try:
        page, has_more = sim_state(request).message_batches.page(after_id, before_id, limit)
    except KeyError as unknown:
        raise invalid_request(f"No message batch with id '{unknown.args[0]}' was found.") from None
    base = _base_url(request)
    data = [batch.as_dict(base) for batch in page]
    return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def message_batches_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/messages/batches", create_message_batch, methods=["POST"])
    router.add_api_route("/v1/messages/batches", list_message_batches, methods=["GET"])
    router.add_api_route("/v1/messages/batches/{batch_id}", retrieve_message_batch, methods=["GET"])
    router.add_api_route("/v1/messages/batches/{batch_id}", delete_message_batch, methods=["DELETE"])
    router.add_api_route("/v1/messages/batches/{batch_id}/results", message_batch_results, methods=["GET"])
    router.add_api_route("/v1/messages/batches/{batch_id}/cancel", cancel_message_batch, methods=["POST"])
    return router
