"""`create_app(config)`: the simulator's FastAPI application. All state lives on `app.state.sim`.

One port serves both providers: OpenAI's routes (`/v1/chat/completions`, `/v1/models`, `/v1/files`,
`/v1/batches`, Bearer key) and Anthropic's (`/v1/messages`, `/v1/messages/batches`, `x-api-key` and
`anthropic-version` headers, Anthropic's error shape)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from tierbatch.simulator.admin import admin_router
from tierbatch.simulator.anthropic_auth import require_anthropic_headers
from tierbatch.simulator.auth import require_api_key
from tierbatch.simulator.batch_store import BatchStore
from tierbatch.simulator.batches import batches_router
from tierbatch.simulator.chat import chat_router
from tierbatch.simulator.config import SimConfig
from tierbatch.simulator.errors import install_error_handlers
from tierbatch.simulator.file_store import FileStore
from tierbatch.simulator.files import files_router
from tierbatch.simulator.message_batches import message_batches_router
from tierbatch.simulator.messages import messages_router
from tierbatch.simulator.models import models_router
from tierbatch.simulator.state import SimState


def create_app(config: SimConfig) -> FastAPI:
    state = SimState(config, FileStore(), BatchStore())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="tierbatch provider simulator", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sim = state
    install_error_handlers(app)
    keyed = [Depends(require_api_key)]
    for router in (chat_router(), models_router(), files_router(), batches_router()):
        app.include_router(router, dependencies=keyed)
    anthropic_keyed = [Depends(require_anthropic_headers)]
    for router in (messages_router(), message_batches_router()):
        app.include_router(router, dependencies=anthropic_keyed)
    app.include_router(admin_router())

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
