"""`GET /v1/models` and `GET /v1/models/{id}`: any model name is served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tierbatch.simulator.state import sim_state

BUILTIN_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano")
MODEL_CREATED = 1_715_367_049


def model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}


async def list_models(request: Request) -> dict[str, Any]:
    config = sim_state(request).config
    names = list(BUILTIN_MODELS)
    for name in config.named_models():
        served = config.model_settings(name).served_as
        for candidate in (name, served):
            if candidate and candidate not in names:
                names.append(candidate)
    return {"object": "list", "data": [model_object(name) for name in names]}


async def retrieve_model(model_id: str) -> dict[str, Any]:
    return model_object(model_id)


def models_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
    return router
