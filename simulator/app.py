"""`create_app(config)`: the simulator's FastAPI application. All state lives on `app.state.sim`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from simulator.admin import admin_router
from simulator.auth import require_api_key
from simulator.batch_store import BatchStore
from simulator.batches import batches_router
from simulator.chat import chat_router
from simulator.config import SimConfig
from simulator.errors import install_error_handlers
from simulator.files import FileStore, files_router
from simulator.models import models_router
from simulator.state import SimState


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
    app.include_router(admin_router())

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
