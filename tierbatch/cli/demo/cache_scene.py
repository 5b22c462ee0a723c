"""The demo's response cache scene: a repeated deterministic question costs nothing the second time."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tierbatch.cli.demo.money import amount, money, to_decimal

CACHE_QUESTION = {"prompt": "What are your support hours? Answer in one sentence.", "task_type": "faq",
                  "urgent": True, "params": {"temperature": 0}}
CACHE_REPEATS = 5


def _wait_tasks(client: httpx.Client, ids: list[str], until: float) -> list[dict[str, Any]]:
    while True:
        bodies = [client.get(f"/v1/tasks/{task_id}").json() for task_id in ids]
        if all(b.get("status") in ("succeeded", "failed", "cancelled") for b in bodies) or time.monotonic() > until:
            return bodies
        time.sleep(0.2)


def run_cache_scene(client: httpx.Client, wait: float) -> dict[str, Any] | None:
    """Ask one deterministic question, then the same question again `CACHE_REPEATS` times at once."""
    until = time.monotonic() + wait
    first = client.post("/v1/tasks", json=CACHE_QUESTION)
    if first.status_code != 202:
        return None
    [answered] = _wait_tasks(client, [first.json()["id"]], until)
    again = client.post("/v1/tasks", json={"tasks": [CACHE_QUESTION] * CACHE_REPEATS})
    if again.status_code != 202:
        return None
    repeats = _wait_tasks(client, [t["id"] for t in again.json()["data"]], until)
    return {"first": {k: answered.get(k) for k in ("status", "mode", "served_model", "cost_usd",
                                                   "baseline_cost_usd")},
            "repeats": [{k: r.get(k) for k in ("status", "mode", "cost_usd", "baseline_cost_usd")} for r in repeats]}


def print_cache_scene(console: Console, scene: dict[str, Any] | None) -> None:
    if scene is None:
        return
    first, repeats = scene["first"], scene["repeats"]
    cached = [r for r in repeats if r["mode"] == "cache"]
    kept = sum((to_decimal(r["baseline_cost_usd"]) or Decimal(0) for r in cached), Decimal(0))
    table = Table(show_header=False, box=None, padding=(0, 2),
                  title="response cache: the same deterministic question again")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("first ask", f"{first['mode']} on {first['served_model']}, ${amount(first['cost_usd'])}")
    table.add_row(f"{len(repeats)} repeats", f"{len(cached)} answered from the cache at $0 "
                  f"(baseline ${money(kept)} kept, so the saving shows in every cost report)")
    console.print(table)
