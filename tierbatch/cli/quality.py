"""`tierbatch quality`: per task type, tier, agreement with its samples and window, promotions and
demotions with their times and figures, latency per model and batch turnaround, over the HTTP API."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from tierbatch.cli.jobs import CliError, api_client, error_text, request


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}"


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title="Quality per task type")
    for header in ("task type", "tier", "pinned", "agreement", "samples", "window", "provider errors",
                   "shadow $"):
        table.add_column(header)
    for row in report["data"]:
        table.add_row(row["task_type"], row["tier"], "yes" if row["pinned"] else "", _pct(row["agreement"]),
                      f"{row['samples']}/{row['min_samples']}", str(row["window"]), str(row["provider_errors"]),
                      row["shadow_cost_usd"] or "-")
    console.print(table)
    events = [e for row in report["data"] for e in row["events"]]
    if events:
        moves = Table(title="Routing changes")
        for header in ("at", "task type", "action", "by", "from", "to", "why"):
            moves.add_column(header)
        for e in sorted(events, key=lambda e: e["at"]):
            moves.add_row(e["at"], e["task_type"], e["action"], e["actor"], e["from_tier"] or "-", e["to_tier"],
                          e["reason"])
        console.print(moves)
    latency = Table(title="Latency per model")
    for header in ("model", "mode", "calls", "p50 ms", "p95 ms"):
        latency.add_column(header)
    for row in report["latency"]:
        latency.add_row(row["model"], row["mode"], str(row["calls"]), _ms(row["p50_ms"]), _ms(row["p95_ms"]))
    console.print(latency)
    turnaround = report["batch_turnaround"]
    console.print(f"Batch turnaround: {turnaround['tasks']} tasks, p50 {_ms(turnaround['p50_seconds'])} s, "
                  f"p95 {_ms(turnaround['p95_seconds'])} s")


def run_quality(api_url: str, api_key: str | None, as_json: bool) -> None:
    with api_client(api_url, api_key, timeout=60) as client:
        response = request(client, "GET", "/v1/quality")
        if response.status_code != 200:
            raise CliError(error_text(response))
        report = response.json()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console())
