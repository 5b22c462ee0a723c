"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.context import ApiContext
from api.errors import install_error_handlers
from api.routes import admin, health, tasks
from api.routes import costs as costs_routes  # costs and budgets (issue 4)
from api.routes import jobs as jobs_routes  # bulk jobs (issue 3)
from core.config import AppConfig, load_config
from core.settings import Settings


def create_app(settings: Settings | None = None, config: AppConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or load_config(settings.config_path)
    ctx = ApiContext.build(settings, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.close()

    app = FastAPI(title="tierbatch", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (health, tasks, admin):
        app.include_router(module.router)
    app.include_router(jobs_routes.router)  # bulk jobs (issue 3)
    app.include_router(costs_routes.router)  # costs and budgets (issue 4)
    return app
