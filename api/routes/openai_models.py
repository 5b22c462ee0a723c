"""`GET /v1/models`: `smart-select` and the configured models, in OpenAI's `ListModelsResponse` shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tierbatch.api.routes.openai_chat import authenticate, context_of
from tierbatch.base.errors import ModelNotFound
from tierbatch.gateway.routing import listed_models

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    await authenticate(request)
    return {"object": "list", "data": listed_models(context_of(request).config)}


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    await authenticate(request)
    for model in listed_models(context_of(request).config):
        if model["id"] == model_id:
            return model
    raise ModelNotFound(model_id, None)
