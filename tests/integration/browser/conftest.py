"""The dashboard in a real browser: the system's chromium driven by Playwright, against a real stack.

The browser tests run their own API, worker and beat on the session's database and simulator (like
test_quality.py), with every Light task shadowed so the quality page has agreement to draw. The data is
seeded once for the package through the API: two tenants, a job through the batch path (named with a
<script> to prove it stays text), immediate tasks, a chat completion, a schedule run and a pinned route.

Chromium comes from the system (`/usr/bin/chromium`, apt's package; CI installs it). Playwright never
downloads a browser here. Without chromium the tests skip, except under `make test`
(TIERBATCH_REQUIRE_BROWSER=1), where they fail.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.support.procs import REPO_ROOT, wait_until
from tests.support.stack import ADMIN_TOKEN, Stack, psycopg_dsn, sibling_stack

CHROMIUM = os.environ.get("TIERBATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
XSS_NAME = "<script>window.__xss=1</script>"
LABELS = ["billing", "account", "bug"]
FORMULA_TASK_TYPE = "=1+2"  # a task type a spreadsheet would evaluate

QUALITY = """
[quality]
shadow_rate = 1.0
min_samples = 4
window = 10
probe_rate = 1.0
promote_below = 0.9
demote_above = 0.95
"""


@dataclass
class Seeded:
    stack: Stack
    a_id: str
    a_key: str
    b_id: str
    b_key: str
    a_job: str  # the batch-path job, named XSS_NAME
    a_task: str  # one of the job's tasks
    a_immediate: str  # an immediate task
    b_job: str
    b_task: str
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="package")
def dash_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with sibling_stack(stack, Path(tmp_path_factory.mktemp("dashboard")), QUALITY) as own:
        yield own


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] == "completed" else None

    try:
        return wait_until(finished, timeout, 0.25, f"job {job_id} completed")  # type: ignore[return-value]
    except TimeoutError:
        raise AssertionError(f"job never completed: {client.get(f'/v1/jobs/{job_id}').json()}") from None


def _submit_job(client: httpx.Client, name: str, count: int, prefix: str) -> str:
    items = [{"id": f"{prefix}-{i}", "text": f"Ticket {i}: I was charged twice for my plan"} for i in range(count)]
    body = _ok(client.post("/v1/jobs", json={"name": name, "task_type": "classification", "tier": "light",
                                             "labels": LABELS, "items": items}), 202)
    return str(body["id"])


def _immediate(stack: Stack, client: httpx.Client, prompt: str, task_type: str = "summary") -> str:
    body = _ok(client.post("/v1/tasks", json={"prompt": prompt, "task_type": task_type, "urgent": True}), 202)
    stack.wait_for_task(client, body["id"], {"succeeded"}, timeout=60)
    return str(body["id"])


def _first_task(stack: Stack, job_id: str) -> str:
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        row = conn.execute("SELECT id FROM tasks WHERE job_id = %s ORDER BY id LIMIT 1", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _schedule_run(stack: Stack, client: httpx.Client, tenant_id: str) -> None:
    home = stack.tenant_dir(tenant_id)
    with (home / "tickets.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "body"])
        for i in range(3):
            writer.writerow([f"S-{i}", f"Ticket {i}: the app crashes on start"])
    job = {"tier": "light", "system": "Route the support ticket.", "template": "Ticket: {text}", "labels": LABELS}
    schedule = _ok(client.post("/v1/schedules", json={
        "name": "nightly-tickets", "cron": "0 3 * * *", "timezone": "UTC", "enabled": False, "job": job,
        "source": {"type": "file", "path": "tickets.csv", "id_field": "id", "text_field": "body"}}), 201)
    run = _ok(client.post(f"/v1/schedules/{schedule['id']}/run"), 202)

    def finished() -> bool:
        body = client.get(f"/v1/schedules/{schedule['id']}/runs/{run['id']}").json()
        return body["status"] in ("succeeded", "failed")

    wait_until(finished, 120, 0.25, "schedule run finished")


@pytest.fixture(scope="package")
def seeded(dash_stack: Stack) -> Seeded:
    """Two tenants with work on every path, stored through the API and finished by the worker."""
    stack = dash_stack
    suffix = uuid.uuid4().hex[:6]
    a_id, a_key = stack.new_tenant(f"acme-{suffix}")
    b_id, b_key = stack.new_tenant(f"globex-{suffix}")
    with stack.admin_client() as admin:
        _ok(admin.patch(f"/v1/admin/tenants/{a_id}", json={"monthly_budget_usd": "25", "requests_per_minute": 6000}))
    with stack.client(a_key) as a, stack.client(b_key) as b:
        a_job = _submit_job(a, XSS_NAME, 6, "a")
        b_job = _submit_job(b, f"globex-only-job-{suffix}", 4, "b")
        a_immediate = _immediate(stack, a, "Summarise: the quarterly report shows growth.")
        _immediate(stack, a, "Summarise: the office moves next week.")
        _immediate(stack, a, "Summarise: a formula.", task_type=FORMULA_TASK_TYPE)
        b_task = _immediate(stack, b, "Summarise: globex private memo.")
        _ok(a.post("/v1/chat/completions", json={"model": "smart-select", "messages": [
            {"role": "user", "content": "Say hi"}]}))
        _wait_job(a, a_job)
        _wait_job(b, b_job)
        _schedule_run(stack, a, a_id)
        _ok(a.put("/v1/routes/summary", json={"tier": "light", "pinned": True, "reason": "seeded"}))
    return Seeded(stack, a_id, a_key, b_id, b_key, a_job, _first_task(stack, a_job), a_immediate, b_job, b_task,
                  {"suffix": suffix})


# --- the browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        message = f"chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("TIERBATCH_REQUIRE_BROWSER"):
            pytest.fail(f"the browser tests must run here (TIERBATCH_REQUIRE_BROWSER is set): {message}")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        if os.environ.get("TIERBATCH_REQUIRE_BROWSER"):
            pytest.fail(f"the browser tests must run here (TIERBATCH_REQUIRE_BROWSER is set): {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watch:
    """What a page did: console errors, uncaught exceptions, and every URL it requested."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def foreign_hosts(self, origin: str) -> list[str]:
        ours = urlsplit(origin).netloc
        return [url for url in self.requests
                if urlsplit(url).scheme not in ("data", "blob", "about") and urlsplit(url).netloc != ours]


def watch(page: Any) -> Watch:
    seen = Watch()
    page.on("console", lambda message: seen.errors.append(f"console: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: seen.errors.append(f"pageerror: {error}"))
    page.on("request", lambda request: seen.requests.append(request.url))
    return seen


@pytest.fixture
def new_context(browser: Any) -> Iterator[Callable[..., Any]]:
    """`new_context(bearer=None)`: a fresh browser context (own cookies) at 1280x800; closed after the test."""
    contexts: list[Any] = []

    def make(bearer: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        context = browser.new_context(viewport=VIEWPORT, extra_http_headers=headers)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()


def sign_in(context: Any, base_url: str, secret: str) -> Any:
    """Sign in through the form; the page, now on the overview."""
    page = context.new_page()
    page.goto(f"{base_url}/dashboard/login")
    page.fill("#secret", secret)
    page.click("#sign-in")
    page.wait_for_url(f"{base_url}/dashboard")
    return page


ADMIN = ADMIN_TOKEN
