"""The demo's report: the figures read back from the API (tasks, quality, spend by mode), and their printing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierbatch.cli.demo.cache_scene import print_cache_scene
from tierbatch.cli.demo.money import amount, money, to_decimal
from tierbatch.cli.demo.quality_scene import print_quality_scene
from tierbatch.cli.demo.schedule import print_schedule
from tierbatch.cli.demo.workload import DemoTask
from tierbatch.cli.stack.local_stack import StackInfo


def build_report(info: StackInfo, tasks: list[DemoTask]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    total_cost = total_baseline = Decimal(0)
    counts: dict[str, int] = {}
    priced = 0
    for task in tasks:
        body = task.body or {}
        usage = body.get("usage") or {}
        cost = to_decimal(body.get("cost_usd"))
        baseline = to_decimal(body.get("baseline_cost_usd"))
        counts[task.status] = counts.get(task.status, 0) + 1
        if cost is not None:
            priced += 1
            total_cost += cost
            total_baseline += baseline if baseline is not None else cost
        rows.append({
            "id": task.id, "label": task.label, "group": task.group, "task_type": task.spec["task_type"],
            "output": body.get("output"),
            "tier": body.get("tier"), "urgent": bool(task.spec.get("urgent")), "status": task.status,
            "mode": body.get("mode"), "model": body.get("model"), "served_model": body.get("served_model"),
            "input_tokens": usage.get("input_tokens"), "cached_tokens": usage.get("cached_tokens"),
            "output_tokens": usage.get("output_tokens"),
            "cost_usd": None if cost is None else money(cost),
            "baseline_cost_usd": None if baseline is None else money(baseline),
            "error": body.get("error"),
        })
    by_mode: dict[str, dict[str, str]] = {}
    for mode in sorted({str(r["mode"]) for r in rows if r["cost_usd"] is not None}):
        cost = sum((Decimal(r["cost_usd"]) for r in rows if r["mode"] == mode and r["cost_usd"]), Decimal(0))
        base = sum((Decimal(r["baseline_cost_usd"]) for r in rows
                    if r["mode"] == mode and r["baseline_cost_usd"]), Decimal(0))
        by_mode[mode] = {"cost_usd": money(cost), "baseline_cost_usd": money(base),
                         "savings_percent": str((((base - cost) * 100) / base).quantize(Decimal("0.1")))
                         if base else "0"}
    savings = total_baseline - total_cost
    percent = (savings * 100 / total_baseline).quantize(Decimal("0.1")) if total_baseline else Decimal(0)
    failed = [t.label for t in tasks if t.immediate and t.status != "succeeded"]
    return {
        "stack": {"api_url": info.api_url, "simulator_url": info.simulator_url, "data_dir": str(info.data_dir),
                  "database_url": info.database_url, "redis_url": info.redis_url},
        "tasks": rows,
        "totals": {"tasks": len(tasks), "priced_tasks": priced, "statuses": counts,
                   "cost_usd": money(total_cost), "baseline_cost_usd": money(total_baseline),
                   "savings_usd": money(savings), "savings_percent": str(percent), "by_mode": by_mode},
        "immediate_failed": failed, "ok": not failed,
    }


def print_report(console: Console, report: dict[str, Any]) -> None:
    table = Table(title="tierbatch demo", header_style="bold")
    for name in ("task", "tier", "status", "mode", "model asked", "served model"):
        table.add_column(name)
    for name in ("input", "cached", "output", "cost USD", "baseline USD"):
        table.add_column(name, justify="right")
    styles = {"succeeded": "green", "failed": "red", "waiting_batch": "yellow", "in_batch": "yellow"}
    for row in report["tasks"]:
        status = row["status"]
        tier = f"{row['tier']}{' urgent' if row['urgent'] else ''}"
        cells = [row["label"], tier, f"[{styles.get(status, 'white')}]{status}[/]", row["mode"] or "-",
                 row["model"] or "-", row["served_model"] or "-"]
        cells += ["-" if row[k] is None else str(row[k])
                  for k in ("input_tokens", "cached_tokens", "output_tokens", "cost_usd", "baseline_cost_usd")]
        table.add_row(*cells)
    console.print(table)
    totals = report["totals"]
    summary = Table(show_header=False, box=None, padding=(0, 2), title="savings")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("priced tasks", f"{totals['priced_tasks']} of {totals['tasks']}")
    summary.add_row("total cost", f"${totals['cost_usd']}")
    summary.add_row("baseline (all on the complex model)", f"${totals['baseline_cost_usd']}")
    summary.add_row("savings", f"[green]${totals['savings_usd']} ({totals['savings_percent']}%)[/]")
    for mode, figures in totals["by_mode"].items():
        summary.add_row(f"  {mode} calls", f"${figures['cost_usd']} instead of ${figures['baseline_cost_usd']} "
                                          f"({figures['savings_percent']}% saved)")
    console.print(summary)
    console.print("[dim]a task's cost includes its shadow call when the quality monitor sampled it; "
                  "spend by mode below shows shadow calls apart[/]")
    waiting = totals["statuses"].get("waiting_batch", 0) + totals["statuses"].get("in_batch", 0)
    if waiting:
        console.print(f"[yellow]{waiting} non-urgent Light task(s) still waiting for a provider batch "
                      "(batch pricing applies when they finish); not counted above.[/]")
    if report["immediate_failed"]:
        console.print("[bold red]immediate tasks not succeeded:[/] " + ", ".join(report["immediate_failed"]))


def quality_overview(client: httpx.Client) -> list[dict[str, Any]]:
    """Every task type the quality monitor knows for this run's tenant, with its changes (GET /v1/quality)."""
    response = client.get("/v1/quality")
    if response.status_code != 200:
        return []
    return [{"task_type": r["task_type"], "tier": r["tier"], "samples": r["samples"], "agreement": r["agreement"],
             "shadow_cost_usd": r["shadow_cost_usd"], "events": r["events"]} for r in response.json()["data"]]


def costs_by_mode(client: httpx.Client) -> dict[str, Any] | None:
    """This run's spend by mode (GET /v1/costs?group_by=mode): every ledger row, shadow calls included."""
    response = client.get("/v1/costs", params={"group_by": "mode"})
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return {"rows": body["rows"], "totals": body["totals"]}


def print_costs_by_mode(console: Console, costs: dict[str, Any] | None) -> None:
    if costs is None:
        return
    table = Table(title="this run's spend by mode (GET /v1/costs?group_by=mode)", header_style="bold",
                  show_footer=True)
    totals = costs["totals"]
    table.add_column("mode", footer="total")
    for name, key in (("requests", "requests"), ("cost USD", "cost_usd"), ("baseline USD", "baseline_cost_usd"),
                      ("savings USD", "savings_usd")):
        table.add_column(name, justify="right", footer=amount(totals.get(key)))
    for row in costs["rows"]:
        if row["mode"] == "shadow":  # spend only: no baseline, no savings (tierbatch/costs/query.py)
            table.add_row("shadow (quality monitor)", str(row["requests"]), amount(row["cost_usd"]), "-", "-")
        else:
            table.add_row(row["mode"], str(row["requests"]), amount(row["cost_usd"]),
                          amount(row["baseline_cost_usd"]), amount(row["savings_usd"]))
    console.print(table)
    shadow = next((row for row in costs["rows"] if row["mode"] == "shadow"), None)
    if shadow is not None:
        total = to_decimal(totals.get("cost_usd")) or Decimal(0)
        spent = to_decimal(shadow["cost_usd"]) or Decimal(0)
        savings = to_decimal(totals.get("savings_usd")) or Decimal(0)
        share = f", {spent * 100 / total:.1f}% of this run's spend" if total else ""
        console.print(f"shadow spend (quality monitor): ${money(spent)} over {shadow['requests']} premium-model "
                      f"calls{share}; savings net of it: ${money(savings - spent)}", highlight=False)


def open_model_summary(info: StackInfo) -> dict[str, Any]:
    """The open model serving the light tier (`--open-model`): where, and the price the ledger uses."""
    from tierbatch.cli.stack.open_model import ALIAS, OPERATOR_PRICES

    return {"model": ALIAS, "server": "llama-server (llama.cpp)", "base_url": info.open_model_url,
            "prices_per_million_tokens": dict(OPERATOR_PRICES)}


ANSWER_CHARS = 90


def print_answers(console: Console, report: dict[str, Any]) -> None:
    """With `--open-model`: the real answers, the open model's beside the premium tier's."""
    summary = report.get("open_model")
    if not summary:
        return
    prices = summary["prices_per_million_tokens"]
    console.print(f"light tier: [bold]{summary['model']}[/] on {summary['server']} at {summary['base_url']}, "
                  f"priced at the operator's compute cost (USD {prices['input']} input, {prices['output']} "
                  "output per million tokens), not a provider's price", highlight=False, soft_wrap=True)
    table = Table(title="answers", header_style="bold")
    for name in ("task", "served model", "answer"):
        table.add_column(name)
    for row in report["tasks"]:
        text = " ".join(str(row["output"] or row["error"] or "-").split())
        shown = text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS - 1] + "…"
        table.add_row(row["label"], row["served_model"] or "-", escape(shown))
    console.print(table)


def render_report(console: Console, report: dict[str, Any]) -> None:
    """The report for people: the workload, the schedule run, the quality scene, spend by mode."""
    print_report(console, report)
    print_answers(console, report)
    print_schedule(console, report.get("schedule_run"))
    print_cache_scene(console, report.get("cache_scene"))
    print_quality_scene(console, report.get("quality_scene"), report.get("quality_scene_skipped"))
    print_costs_by_mode(console, report.get("costs_by_mode"))
