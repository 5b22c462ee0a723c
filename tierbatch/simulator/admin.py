"""`/_sim/*`: change settings at run time, reset and read the counters. Never needs a key.

`GET /_sim/config` the running config; `POST /_sim/config` deep-merges a JSON patch into it (a
`null` removes a key, e.g. a model table); `PUT /_sim/config` replaces it; `POST /_sim/reset`
clears the counters and the prompt cache; `GET /_sim/stats` the counters; `GET /_sim/verdicts`,
with the config's `record_verdicts`, whether each chat answer given was the reference model's:
`{"reference": [answer ids], "other": [answer ids]}` (the `id` of the chat completion, immediate or
in a batch output line).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tierbatch.simulator.config import SimConfigError, merge_sim_config, parse_sim_config
from tierbatch.simulator.errors import OpenAIError, parse_json_body
from tierbatch.simulator.state import sim_state


async def get_config(request: Request) -> dict[str, Any]:
    return sim_state(request).config.model_dump(mode="json")


async def update_config(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    patch = parse_json_body(await request.body())
    try:
        config = merge_sim_config(state.config, patch)
    except SimConfigError as exc:
        raise OpenAIError(400, str(exc), "invalid_request_error", None, "invalid_config") from None
    state.set_config(config)
    return config.model_dump(mode="json")


async def replace_config(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    body = parse_json_body(await request.body())
    try:
        config = parse_sim_config(body, source="config")
    except SimConfigError as exc:
        raise OpenAIError(400, str(exc), "invalid_request_error", None, "invalid_config") from None
    state.set_config(config)
    return config.model_dump(mode="json")


async def reset(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    state.reset()
    return state.stats.as_dict()


async def stats(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    out = state.stats.as_dict()
    out["batches_by_status"] = state.batches.count_by_status()
    out["message_batches_by_status"] = state.message_batches.count_by_status()
    return out


async def verdicts(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    kept = state.stats.verdicts
    return {"recording": state.config.record_verdicts,
            "reference": [answer_id for answer_id, reference in kept.items() if reference],
            "other": [answer_id for answer_id, reference in kept.items() if not reference]}


def admin_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/_sim/config", get_config, methods=["GET"])
    router.add_api_route("/_sim/config", update_config, methods=["POST"])
    router.add_api_route("/_sim/config", replace_config, methods=["PUT"])
    router.add_api_route("/_sim/reset", reset, methods=["POST"])
    router.add_api_route("/_sim/stats", stats, methods=["GET"])
    router.add_api_route("/_sim/verdicts", verdicts, methods=["GET"])
    return router
