"""Scheduled classification in the demo: a nightly schedule over the sample CSV of support tickets, run once now."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

# the sample lives beside the CLI modules (package data of tierbatch.cli)
SAMPLE_TICKETS = Path(__file__).resolve().parents[1] / "samples" / "support_tickets.csv"
DEMO_SCHEDULE: dict[str, Any] = {
    "name": "demo-support-tickets", "cron": "0 2 * * *", "timezone": "UTC",
    "job": {"tier": "light", "urgent": False, "system": "Route the support ticket.", "template": "Ticket: {text}",
            "labels": ["billing", "account", "bug"]},
}


def start_schedule(client: httpx.Client, err: Console) -> tuple[str, str] | None:
    """Create the demo schedule and run it now; (schedule id, run id), or None when that is not possible."""
    if not SAMPLE_TICKETS.exists():
        err.print(f"[yellow]no sample tickets at {SAMPLE_TICKETS}: the schedule demo is skipped[/]")
        return None
    # the tenant's data goes up as a file of its own (purpose user_data); the schedule reads it by id
    with SAMPLE_TICKETS.open("rb") as handle:
        uploaded = client.post("/v1/files", data={"purpose": "user_data"},
                               files={"file": (SAMPLE_TICKETS.name, handle, "text/csv")})
    if uploaded.status_code != 200:
        err.print(f"[yellow]could not upload the demo tickets: {uploaded.text[:300]}[/]")
        return None
    source = {"type": "file", "file_id": uploaded.json()["id"], "format": "csv", "id_field": "id",
              "text_field": "body"}
    created = client.post("/v1/schedules", json={**DEMO_SCHEDULE, "source": source})
    if created.status_code != 201:
        err.print(f"[yellow]could not create the demo schedule: {created.text[:300]}[/]")
        return None
    schedule_id = created.json()["id"]
    run = client.post(f"/v1/schedules/{schedule_id}/run")
    if run.status_code != 202:
        err.print(f"[yellow]could not run the demo schedule: {run.text[:300]}[/]")
        return None
    return schedule_id, run.json()["id"]


def wait_schedule_run(client: httpx.Client, ids: tuple[str, str] | None, until: float) -> dict[str, Any] | None:
    """The demo run once it has finished, or as it is when `until` (monotonic) has passed."""
    if ids is None:
        return None
    schedule_id, run_id = ids
    while True:
        response = client.get(f"/v1/schedules/{schedule_id}/runs/{run_id}")
        run: dict[str, Any] | None = response.json() if response.status_code == 200 else None
        if run is None or run["status"] != "running" or time.monotonic() >= until:
            return {**run, "name": DEMO_SCHEDULE["name"], "source": str(SAMPLE_TICKETS)} if run else None
        time.sleep(0.5)


def print_schedule(console: Console, run: dict[str, Any] | None) -> None:
    if run is None:
        return
    table = Table(show_header=False, box=None, padding=(0, 2),
                  title=f"scheduled classification: {run['name']} (cron 0 2 * * *), run now")
    table.add_column(style="bold")
    table.add_column()
    style = {"succeeded": "green", "failed": "red"}.get(run["status"], "yellow")
    table.add_row("source", run["source"])
    table.add_row("status", f"[{style}]{run['status']}[/]" + (f" ({run['error']})" if run.get("error") else ""))
    table.add_row("items classified", str(run["task_count"]))
    for label, count in (run.get("label_counts") or {}).items():
        table.add_row(f"  {label}", str(count))
    if run.get("cost_usd") is not None:
        table.add_row("cost", f"${run['cost_usd']} (job {run['job_id']})")
    console.print(table)
