"""HTML pages from Jinja2 templates (autoescaped: every tenant string is text), with the headers every
dashboard page carries."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import HTMLResponse

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# Everything from this origin and nothing inline: chart data rides in <script type="application/json">,
# which is data, not script; the page may not be framed, nor post forms elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def money(value: Decimal | None, places: int = 8) -> str:
    """Dollars with up to `places` decimals (a batch line costs millionths of a cent), at least two."""
    if value is None:
        return "—"
    text = f"{value:,.{places}f}"
    whole, _, cents = text.partition(".")
    cents = cents.rstrip("0").ljust(2, "0")
    return f"${whole}.{cents}"


def number(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def when(value: Any) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(money=money, number=number, when=when)
    return env


ENVIRONMENT = _environment()


def page(template: str, context: dict[str, Any], status: int = 200,
         headers: dict[str, str] | None = None) -> HTMLResponse:
    html = ENVIRONMENT.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})
