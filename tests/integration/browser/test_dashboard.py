"""The dashboard as a browser sees it: every page renders with its charts drawn, no console error and no
request off the stack; sign-in and sign-out through the form; tenants confined to their own rows; the
admin's tenant filter; a <script> job name stays text. Each page's screenshot goes to docs/screenshots/."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.browser.conftest import (
    ADMIN,
    FORMULA_TASK_TYPE,
    SCREENSHOTS,
    XSS_NAME,
    Seeded,
    sign_in,
    watch,
)
from tests.support.stack import psycopg_dsn

pytestmark = pytest.mark.integration

# page → (path, the canvases it draws)
PAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "overview": ("/dashboard", ("chart-daily", "chart-modes")),
    "costs": ("/dashboard/costs?group_by=task_type&group_by=mode", ("chart-costs",)),
    "jobs": ("/dashboard/jobs", ()),
    "job": ("/dashboard/jobs/{a_job}", ("chart-job",)),
    "task": ("/dashboard/tasks/{a_task}", ()),
    "batches": ("/dashboard/batches", ("chart-batches",)),
    "quality": ("/dashboard/quality", ("chart-agreement",)),
    "schedules": ("/dashboard/schedules", ()),
    "limits": ("/dashboard/limits", ("chart-budget",)),
}

DRAWN = """(id) => {
  const canvas = document.getElementById(id);
  if (!canvas) return {missing: true};
  const chart = window.Chart && window.Chart.getChart(canvas);
  const points = chart ? chart.data.datasets.reduce((n, d) => n + d.data.filter((v) => v !== null).length, 0) : 0;
  const blank = document.createElement("canvas");
  blank.width = canvas.width; blank.height = canvas.height;
  return {width: canvas.width, height: canvas.height, chart: !!chart, points: points,
          painted: canvas.toDataURL() !== blank.toDataURL()};
}"""


def _path(seeded: Seeded, template: str) -> str:
    return template.format(a_job=seeded.a_job, a_task=seeded.a_task)


def test_every_page_renders_its_charts_without_errors_or_foreign_requests(
        seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    page = sign_in(new_context(), base, seeded.a_key)
    seen = watch(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, (template, canvases) in PAGES.items():
        response = page.goto(base + _path(seeded, template))
        assert response is not None and response.status == 200, (name, response and response.status)
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        page.wait_for_load_state("load")
        for canvas in canvases:
            state = page.evaluate(DRAWN, canvas)
            assert state.get("chart") and state["width"] > 0 and state["height"] > 0, (name, canvas, state)
            assert state["points"] > 0 and state["painted"], (name, canvas, state)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    assert seen.errors == []
    assert seen.foreign_hosts(base) == []
    assert any(url.endswith("/dashboard/static/chart.umd.min.js") for url in seen.requests)


def test_sign_in_and_out_through_the_form(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    context = new_context()
    page = context.new_page()
    seen = watch(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{base}/dashboard/jobs")
    assert page.url == f"{base}/dashboard/login"  # not signed in: sent to the form
    page.screenshot(path=str(SCREENSHOTS / "login.png"), full_page=True)

    page.fill("#secret", "tb_not-a-real-key-at-all")
    page.click("#sign-in")
    assert "not a valid API key" in page.inner_text("#login-error")
    assert context.cookies() == []

    page.fill("#secret", seeded.a_key)
    page.click("#sign-in")
    page.wait_for_url(f"{base}/dashboard")
    cookies = context.cookies()
    assert len(cookies) == 1
    cookie = cookies[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert seeded.a_key not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # out of reach of scripts

    forged = page.request.post(f"{base}/dashboard/logout", form={"csrf": "not-the-token"})
    assert forged.status == 400  # a sign-out without the session's token is refused ...
    page.goto(f"{base}/dashboard/jobs")
    assert page.url == f"{base}/dashboard/jobs"  # ... and ends nothing

    page.click("#sign-out")
    page.wait_for_url(f"{base}/dashboard/login")
    page.goto(f"{base}/dashboard")
    assert page.url == f"{base}/dashboard/login"
    # the old cookie, replayed, opens nothing: the session is gone from the server
    replay = httpx.get(f"{base}/dashboard", cookies={cookie["name"]: cookie["value"]}, follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"] == "/dashboard/login"
    assert [e for e in seen.errors if "401" not in e] == []


def test_a_wrong_key_is_an_error_on_the_form_not_a_server_error(seeded: Seeded) -> None:
    base = seeded.stack.api_url
    answer = httpx.post(f"{base}/dashboard/login", data={"secret": "wrong"})
    assert answer.status_code == 401
    assert "not a valid API key" in answer.text
    nul = httpx.post(f"{base}/dashboard/login", content=b"secret=a%00b",
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert nul.status_code == 400
    elsewhere = httpx.post(f"{base}/dashboard/login", data={"secret": seeded.a_key},
                           headers={"origin": "https://attacker.example"}, follow_redirects=False)
    assert elsewhere.status_code == 400 and "set-cookie" not in elsewhere.headers  # posted from another site


def test_revoking_the_key_ends_its_sessions(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    stack = seeded.stack
    with stack.admin_client() as admin:
        key = admin.post(f"/v1/admin/tenants/{seeded.a_id}/keys").json()
        page = sign_in(new_context(), stack.api_url, key["api_key"])
        assert page.url.endswith("/dashboard")
        revoked = admin.delete(f"/v1/admin/tenants/{seeded.a_id}/keys/{key['id']}")
        assert revoked.status_code == 200, revoked.text
    page.goto(f"{stack.api_url}/dashboard/jobs")
    assert page.url == f"{stack.api_url}/dashboard/login"


def test_a_tenant_sees_only_its_own_rows(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    page = sign_in(new_context(), base, seeded.a_key)
    for path in (f"/dashboard/jobs/{seeded.b_job}", f"/dashboard/tasks/{seeded.b_task}"):
        response = page.goto(base + path)
        assert response is not None and response.status == 404, path
        assert "globex" not in page.content()
    page.goto(f"{base}/dashboard/jobs")
    listed = page.inner_text("#jobs")
    assert XSS_NAME in listed and "globex-only-job" not in listed
    # a tenant cannot choose another tenant: the parameter is the admin's only
    page.goto(f"{base}/dashboard/jobs?tenant={seeded.b_id}")
    assert "globex-only-job" not in page.inner_text("#jobs")
    page.goto(f"{base}/dashboard/costs?group_by=job")
    assert seeded.b_job not in page.content()


def test_the_admin_sees_every_tenant_and_filters_by_one(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    page = sign_in(new_context(), base, ADMIN)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{base}/dashboard/jobs")
    listed = page.inner_text("#jobs")
    assert XSS_NAME in listed and "globex-only-job" in listed
    page.screenshot(path=str(SCREENSHOTS / "admin-jobs.png"), full_page=True)
    page.select_option("#tenant-select", seeded.b_id)  # the select submits itself
    page.wait_for_url(f"{base}/dashboard/jobs?tenant={seeded.b_id}")
    listed = page.inner_text("#jobs")
    assert "globex-only-job" in listed and XSS_NAME not in listed
    # the nav keeps the chosen tenant
    page.click("nav >> text=Limits")
    page.wait_for_url(f"{base}/dashboard/limits?tenant={seeded.b_id}")
    assert "globex" in page.inner_text("#limits") and "acme" not in page.inner_text("#limits")
    assert page.goto(f"{base}/dashboard/tasks/{seeded.a_task}") is not None  # any tenant's task, unfiltered
    response = page.goto(f"{base}/dashboard/tasks/{seeded.a_task}?tenant={seeded.b_id}")
    assert response is not None and response.status == 404  # ... but not under another tenant's filter


def test_a_script_in_a_job_name_stays_text(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    page = sign_in(new_context(), base, seeded.a_key)
    seen = watch(page)
    for path in ("/dashboard/jobs", f"/dashboard/jobs/{seeded.a_job}"):
        page.goto(base + path)
        assert XSS_NAME in page.inner_text("main")
        assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.inner_text("#job-name") == XSS_NAME
    assert seen.errors == []


def test_bearer_header_pages_and_the_csv_download(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {seeded.a_key}"}) as client:
        answer = client.get("/dashboard/costs.csv", params={"group_by": "task_type"})
        assert answer.status_code == 200
        assert answer.headers["content-disposition"].startswith("attachment;")
        rows = list(csv.DictReader(io.StringIO(answer.text)))
        assert {r["task_type"] for r in rows} >= {"classification", "summary", "'" + FORMULA_TASK_TYPE}
        assert FORMULA_TASK_TYPE not in {r["task_type"] for r in rows}  # neutralised, never a formula
        assert float(sum(float(r["cost_usd"]) for r in rows)) > 0
        bad = client.get("/dashboard/costs", params={"group_by": "tenant"})
        assert bad.status_code == 400 and "tenant" in bad.text  # the admin's dimension
        unauthenticated = httpx.get(f"{base}/dashboard/costs", follow_redirects=False)
        assert unauthenticated.status_code == 303
        assert httpx.get(f"{base}/dashboard/static/dashboard.css").status_code == 200


def test_pin_and_unpin_a_route_from_the_quality_page(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    base = seeded.stack.api_url
    page = sign_in(new_context(), base, seeded.a_key)
    page.goto(f"{base}/dashboard/quality")
    row = page.locator('#routes tr[data-task-type="summary"]')
    assert "yes" in row.inner_text()
    row.locator("button.unpin").click()
    page.wait_for_url(f"{base}/dashboard/quality")
    assert "no" in page.locator('#routes tr[data-task-type="summary"]').inner_text().split("\t")[2]
    with seeded.stack.client(seeded.a_key) as client:
        route = {r["task_type"]: r for r in client.get("/v1/routes").json()["data"]}["summary"]
    assert route["pinned"] is False
    # a form without the session's CSRF token is refused
    forged = page.request.post(f"{base}/dashboard/quality/routes",
                               form={"task_type": "summary", "tier": "complex", "pinned": "true"})
    assert forged.status == 400 and "csrf" in forged.text()


def test_a_task_page_lists_every_ledger_row_of_the_task(seeded: Seeded, new_context: Callable[..., Any]) -> None:
    stack = seeded.stack
    with psycopg.connect(psycopg_dsn(stack.database_url)) as conn:
        rows = conn.execute("SELECT mode::text FROM ledger_entries WHERE task_id = %s ORDER BY created_at, id",
                            (seeded.a_task,)).fetchall()
    page = sign_in(new_context(), stack.api_url, seeded.a_key)
    page.goto(f"{stack.api_url}/dashboard/tasks/{seeded.a_task}")
    shown = page.locator("#ledger tbody tr").all_inner_texts()
    assert len(rows) >= 1
    assert [text.split("\t")[1] for text in shown] == [mode for (mode,) in rows]
