"""The web dashboard at /dashboard: server-rendered pages (Jinja2), Chart.js served from the package."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from tierbatch.api.dashboard.pages import router
from tierbatch.api.dashboard.render import STATIC


def install_dashboard(app: FastAPI) -> None:
    """The dashboard's pages and its static files (no sign-in needed for those: they hold no data)."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
