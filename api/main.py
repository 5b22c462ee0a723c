"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tierbatch import __version__
from tierbatch.api.context import ApiContext
from tierbatch.api.dashboard import install_dashboard  # the web dashboard
from tierbatch.api.errors import install_error_handlers
from tierbatch.api.hot_route import install_hot_route
from tierbatch.api.limits import install_input_guard, route_limits
from tierbatch.api.request_ids import install_request_ids
from tierbatch.api.routes import admin, health, tasks
from tierbatch.api.routes import costs as costs_routes  # costs and budgets
from tierbatch.api.routes import jobs as jobs_routes  # bulk jobs
from tierbatch.api.routes import openai_batches as openai_batches_routes  # OpenAI-compatible surface
from tierbatch.api.routes import openai_chat as openai_chat_routes  # OpenAI-compatible surface
from tierbatch.api.routes import openai_models as openai_models_routes  # OpenAI-compatible surface
from tierbatch.api.routes import provider_batches as provider_batches_routes  # the batch path's batches
from tierbatch.api.routes import quality as quality_routes  # quality-aware routing
from tierbatch.api.routes import schedules as schedules_routes  # scheduled classification
from tierbatch.base.config import AppConfig, load_config
from tierbatch.base.settings import Settings


def create_app(settings: Settings | None = None, config: AppConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or load_config(settings.config_path)
    ctx = ApiContext.build(settings, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # what startup made (modules, config, clients) lives as long as the process: out of the cyclic
        # collector's sight, a full collection no longer walks it (tens of ms each, under load)
        gc.freeze()
        yield
        await ctx.aclose()  # OpenAI-compatible surface: pending call records, async clients
        ctx.close()
        access_lines.flush()

    # no OpenTelemetry provider is configured in this process (metrics are Prometheus'): without this,
    # FastAPI looks the three providers up on every request to find its telemetry off
    app = FastAPI(title="tierbatch", version=__version__, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.ctx = ctx
    install_error_handlers(app)
    install_input_guard(app, ctx.file_limits)
    # `POST /v1/chat/completions` past the framework's stack (its timing, guard and handlers its own)
    install_hot_route(app, route_limits(ctx.file_limits))
    # the outermost layer: every answer and log line of a request has its id
    access_lines = install_request_ids(app)
    for openai_module in (openai_chat_routes, openai_models_routes, openai_batches_routes):
        app.include_router(openai_module.router)
    for module in (health, tasks, admin):
        app.include_router(module.router)
    app.include_router(jobs_routes.router)  # bulk jobs
    app.include_router(schedules_routes.router)  # scheduled classification
    app.include_router(costs_routes.router)  # costs and budgets
    app.include_router(quality_routes.router)  # quality-aware routing
    app.include_router(provider_batches_routes.router)  # the batch path's batches
    install_dashboard(app)  # /dashboard: pages and their static files
    return app
