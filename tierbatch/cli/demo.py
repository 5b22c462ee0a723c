"""`tierbatch demo`: start the local stack, submit a mixed sample workload, print the savings report.

The workload: Complex reasoning tasks (premium model, immediate), urgent Light tasks (cheap model,
immediate) and non-urgent Light classification tasks (the batch path: they wait for a provider
batch and are shown as waiting when they have not finished within the wait). Beside it, a nightly
schedule over a sample CSV of support tickets is created and run once now.

Then the quality scene, last: the simulator's cheap model is made to agree poorly with the
premium one (`POST /_sim/config`), a batch of `sentiment` reviews goes through a provider batch, the
quality monitor shadows a sample of them on the premium model and promotes `sentiment` to complex; the
report prints the promotion event (GET /v1/quality) and the run's spend by mode (GET /v1/costs), shadow
spend on its own line. The run uses a tenant of its own, so a second run starts from fresh rules and
its cost figures are its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierbatch.base.config import load_config
from tierbatch.base.states import TERMINAL_TASK_STATUSES as TERMINAL
from tierbatch.cli.stack import LocalStack, StackError, StackInfo, sigterm_as_interrupt
from tierbatch.quality.monitor import sampled

IMMEDIATE_GROUPS = ("complex", "light urgent")
BATCH_GROUP = "light batch"

# quality scene: a task type whose cheap model agrees poorly with the premium one
QUALITY_TASK_TYPE = "sentiment"
QUALITY_ITEMS = 240  # about 48 shadowed at 20%; fewer than the 20 that decide: about 2 in 10 million
POOR_AGREEMENT = 0.5  # the simulator's share of the cheap model's labels equal to the premium model's
# Quality settings that decide within one small batch: 20% of Light tasks shadowed, a verdict after 20
# comparisons. The main workload stays far from that (about 10 classification comparisons, at the
# simulator's usual 95% agreement), so only the scene's task type moves.
DEMO_QUALITY: dict[str, Any] = {"shadow_rate": 0.2, "min_samples": 20, "window": 50}

# For the demo's generated config: assemble and poll batches quickly, so batch tasks can finish in the wait.
DEMO_CONFIG_OVERRIDES: dict[str, Any] = {"batch": {"max_wait_seconds": 5, "poll_interval_seconds": 2},
                                         "routing": {QUALITY_TASK_TYPE: "light"}, "quality": DEMO_QUALITY}

_COMPLEX = [
    ("plan-migration", "A service stores 2 TB in one Postgres table and must move it to a partitioned table "
                       "without downtime. Give a step-by-step plan and the main risks."),
    ("prove-sum", "Prove that the sum of the first n odd numbers is n squared, then explain the idea "
                  "to a twelve-year-old."),
    ("pricing-tradeoff", "A SaaS has 3 pricing tiers and 40% of users on the free tier. Reason about "
                         "whether removing the free tier raises revenue; list the assumptions."),
    ("debug-race", "Two workers sometimes process the same job twice. The queue acks before the work "
                   "is done. Explain the race and propose a fix with idempotency."),
]
_URGENT = [
    ("classify-refund", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                          "word.\nTicket: I was charged twice for my subscription."),
    ("classify-login", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                         "word.\nTicket: I cannot log in after resetting my password."),
    ("classify-crash", "classification", "Classify the ticket as billing, account or bug. Answer with one "
                                         "word.\nTicket: The app crashes when I open settings."),
    ("extract-order", "extraction", "Extract the order number and the date as JSON.\n"
                                    "Text: Order #A-1042 was shipped on 2024-05-03."),
    ("extract-contact", "extraction", "Extract the name and email as JSON.\n"
                                      "Text: Please reach Maria Lopez at maria.lopez@example.com."),
    ("extract-amount", "extraction", "Extract the amount and the currency as JSON.\n"
                                     "Text: The invoice total is 1,250.00 EUR."),
]
_BATCH = [
    ("sentiment-1", "The delivery was fast and the product works perfectly."),
    ("sentiment-2", "Terrible support, I waited two weeks for an answer."),
    ("sentiment-3", "It is fine, nothing special."),
    ("sentiment-4", "Best purchase this year, highly recommended."),
    ("sentiment-5", "The box arrived damaged and a part was missing."),
    ("sentiment-6", "Works as described."),
]


# --- scheduled classification: a nightly schedule over the sample CSV, run once now ------------------
SAMPLE_TICKETS = Path(__file__).resolve().parent / "samples" / "support_tickets.csv"
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
# --- end scheduled classification ----------------------------------------------------------------------


@dataclass
class DemoTask:
    label: str
    group: str
    spec: dict[str, Any]
    id: str = ""
    body: dict[str, Any] | None = None

    @property
    def immediate(self) -> bool:
        return self.group in IMMEDIATE_GROUPS

    @property
    def status(self) -> str:
        return str((self.body or {}).get("status") or "unknown")

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


SENTIMENT_LABELS = ["positive", "neutral", "negative"]


def sample_workload() -> list[DemoTask]:
    tasks = [DemoTask(label, "complex", {"prompt": prompt, "task_type": "reasoning", "tier": "complex",
                                         "params": {"max_tokens": 400}})
             for label, prompt in _COMPLEX]
    tasks += [DemoTask(label, "light urgent", {"prompt": prompt, "task_type": task_type, "tier": "light",
                                               "urgent": True, "params": {"max_tokens": 60}})
              for label, task_type, prompt in _URGENT]
    # the batch group is one bulk classification job (POST /v1/jobs): labels, system prompt, template
    tasks += [DemoTask(label, BATCH_GROUP, {"text": text, "task_type": "classification", "tier": "light",
                                            "urgent": False})
              for label, text in _BATCH]
    for task in tasks:
        if task.immediate:
            task.spec["metadata"] = {"demo": task.label}
    return tasks


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


def submit(client: httpx.Client, tasks: list[DemoTask]) -> None:
    immediate = [t for t in tasks if t.immediate]
    response = client.post("/v1/tasks", json={"tasks": [task.spec for task in immediate]})
    if response.status_code != 202:
        raise StackError(f"POST /v1/tasks answered {response.status_code}: {response.text[:500]}")
    for task, item in zip(immediate, response.json()["data"], strict=True):
        task.id = str(item["id"])
        task.body = item
    batch = [t for t in tasks if not t.immediate]
    if not batch:
        return
    job = client.post("/v1/jobs", json={
        "name": "demo-sentiment", "task_type": "classification", "tier": "light", "urgent": False,
        "system": "Classify the sentiment of the customer review.", "template": "Review: {text}",
        "labels": SENTIMENT_LABELS, "items": [{"id": t.label, "text": t.spec["text"]} for t in batch],
    })
    if job.status_code != 202:
        raise StackError(f"POST /v1/jobs answered {job.status_code}: {job.text[:500]}")
    listed = client.get("/v1/tasks", params={"job_id": job.json()["id"], "limit": 1000})
    by_item = {str(t.get("item_id")): t for t in listed.json()["data"]}
    for task in batch:
        task.body = by_item[task.label]
        task.id = str(task.body["id"])


def poll(client: httpx.Client, tasks: list[DemoTask], wait: float, batch_wait: float,
         progress: Progress) -> None:
    """Poll until every task is terminal or `wait` has passed; stop after `batch_wait` when the immediate
    tasks are done and no batch task has reached a provider batch (the batch path is not moving)."""
    groups = {group: progress.add_task(group, total=sum(1 for t in tasks if t.group == group))
              for group in (*IMMEDIATE_GROUPS, BATCH_GROUP)}
    start = time.monotonic()
    while True:
        for task in tasks:
            if not task.done:
                response = client.get(f"/v1/tasks/{task.id}")
                if response.status_code == 200:
                    task.body = response.json()
        for group, bar in groups.items():
            members = [t for t in tasks if t.group == group]
            waiting = sum(1 for t in members if t.status in ("waiting_batch", "in_batch"))
            suffix = f" ({waiting} waiting for a batch)" if waiting else ""
            progress.update(bar, completed=sum(1 for t in members if t.done), description=group + suffix)
        elapsed = time.monotonic() - start
        immediate_done = all(t.done for t in tasks if t.immediate)
        # batch tasks that were never placed in a provider batch after `batch_wait` will not finish soon
        batch_stuck = not any(t.status == "in_batch" for t in tasks if not t.immediate)
        if (all(t.done for t in tasks) or elapsed >= wait
                or (immediate_done and batch_stuck and elapsed >= batch_wait)):
            return
        time.sleep(0.5)


def build_report(info: StackInfo, tasks: list[DemoTask]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    total_cost = total_baseline = Decimal(0)
    counts: dict[str, int] = {}
    priced = 0
    for task in tasks:
        body = task.body or {}
        usage = body.get("usage") or {}
        cost = _decimal(body.get("cost_usd"))
        baseline = _decimal(body.get("baseline_cost_usd"))
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
            "cost_usd": None if cost is None else _money(cost),
            "baseline_cost_usd": None if baseline is None else _money(baseline),
            "error": body.get("error"),
        })
    by_mode: dict[str, dict[str, str]] = {}
    for mode in sorted({str(r["mode"]) for r in rows if r["cost_usd"] is not None}):
        cost = sum((Decimal(r["cost_usd"]) for r in rows if r["mode"] == mode and r["cost_usd"]), Decimal(0))
        base = sum((Decimal(r["baseline_cost_usd"]) for r in rows
                    if r["mode"] == mode and r["baseline_cost_usd"]), Decimal(0))
        by_mode[mode] = {"cost_usd": _money(cost), "baseline_cost_usd": _money(base),
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
                   "cost_usd": _money(total_cost), "baseline_cost_usd": _money(total_baseline),
                   "savings_usd": _money(savings), "savings_percent": str(percent), "by_mode": by_mode},
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


# --- quality scene: a poor cheap model, its task type promoted, shadow spend on its own line ------------
_REVIEW_OPENINGS = (
    "Arrived a day early and works perfectly", "Stopped working after a week", "Does what it says",
    "The colour is not the one in the pictures", "Great value for the price", "Support never answered me",
    "Flimsy, but it does the job", "Exactly what I was looking for", "The manual is useless",
    "Would buy it again", "Too loud for a small flat", "Fine for occasional use",
)
_REVIEW_PRODUCTS = ("kettle", "desk lamp", "backpack", "headphones", "coffee grinder", "phone case",
                    "rain jacket", "blender", "keyboard", "water bottle", "toaster", "office chair",
                    "camera strap", "air fryer", "bike light", "travel mug", "monitor arm", "yoga mat",
                    "power bank", "alarm clock")


def quality_scene_items() -> list[dict[str, str]]:
    """Distinct, fixed reviews: the simulator's answers are a stable hash of the prompt."""
    return [{"id": f"review-{i + 1}",
             "text": f"{_REVIEW_OPENINGS[i % len(_REVIEW_OPENINGS)]} (the {_REVIEW_PRODUCTS[i // 12 % 20]}, "
                     f"order {4100 + i})."}
            for i in range(QUALITY_ITEMS)]


@dataclass(frozen=True)
class SceneSetup:
    """What the scene needs: the demo's own simulator, and the models and quality settings it serves."""

    simulator_url: str
    light_model: str
    complex_model: str
    shadow_rate: float
    min_samples: int
    promote_below: float


def scene_setup(info: StackInfo) -> SceneSetup | str:
    """The scene's setup, or why it cannot run (it needs the simulator and the demo's generated config)."""
    if info.simulator_url is None:
        return "no simulator (TIERBATCH_CONFIG names the providers)"
    if os.environ.get("TIERBATCH_CONFIG"):
        return "TIERBATCH_CONFIG is set: the demo's quality settings do not apply"
    config = load_config(info.config_path)
    return SceneSetup(info.simulator_url, config.tiers["light"].model, config.tiers["complex"].model,
                      config.quality.shadow_rate, config.quality.min_samples, config.quality.promote_below)


def _sim_config(setup: SceneSetup, patch: dict[str, Any]) -> dict[str, Any]:
    """Merge `patch` into the running simulator's settings; the settings after it."""
    response = httpx.post(f"{setup.simulator_url}/_sim/config", json=patch, timeout=10)
    if response.status_code != 200:
        raise StackError(f"simulator POST /_sim/config answered {response.status_code}: {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


def make_premium_the_reference(setup: SceneSetup) -> None:
    """The premium model gives the reference labels; the cheap one agrees with it at its `agreement`."""
    _sim_config(setup, {"models": {setup.complex_model: {"reference": True}}})


def new_run_tenant(client: httpx.Client, info: StackInfo) -> str:
    """A tenant for this run (admin API): fresh routing rules, and cost figures of this run only."""
    name = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    response = client.post("/v1/admin/tenants", json={"name": name},
                           headers={"Authorization": f"Bearer {info.admin_token}"})
    if response.status_code != 201:
        raise StackError(f"POST /v1/admin/tenants answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["api_key"])


def _quality_row(client: httpx.Client, task_type: str) -> dict[str, Any] | None:
    response = client.get("/v1/quality")
    if response.status_code != 200:
        return None
    return next((row for row in response.json()["data"] if row["task_type"] == task_type), None)


def _shadow_calls(client: httpx.Client, task_type: str) -> int:
    response = client.get("/v1/costs", params={"group_by": "mode", "task_type": task_type})
    if response.status_code != 200:
        return 0
    return sum(int(row["requests"]) for row in response.json()["rows"] if row["mode"] == "shadow")


def run_quality_scene(client: httpx.Client, setup: SceneSetup, wait: float, progress: Progress,
                      err: Console) -> dict[str, Any]:
    """Poor agreement on, a bulk job of reviews through the batch path, until the task type is promoted
    and every sampled review has its shadow answer (or `wait` has passed); agreement restored after."""
    before = _sim_config(setup, {})["models"].get(setup.light_model)
    _sim_config(setup, {"models": {setup.light_model: {"agreement": POOR_AGREEMENT}}})
    try:
        scene = _run_scene(client, setup, wait, progress, err)
    finally:
        # the simulator's settings are per model: the cheap model's own table is put back as it was
        _sim_config(setup, {"models": {setup.light_model: None}})
        if before:
            _sim_config(setup, {"models": {setup.light_model: before}})
    return scene


def _run_scene(client: httpx.Client, setup: SceneSetup, wait: float, progress: Progress,
               err: Console) -> dict[str, Any]:
    err.print(f"quality scene: {setup.light_model} now agrees with {setup.complex_model} on "
              f"{POOR_AGREEMENT:.0%} of labels; {QUALITY_ITEMS} {QUALITY_TASK_TYPE} reviews go through a "
              f"provider batch, {setup.shadow_rate:.0%} are shadowed on {setup.complex_model}")
    job = client.post("/v1/jobs", json={
        "name": "demo-quality-sentiment", "task_type": QUALITY_TASK_TYPE, "urgent": False,
        "system": "Classify the sentiment of the customer review.", "template": "Review: {text}",
        "labels": SENTIMENT_LABELS, "items": quality_scene_items(),
    })
    if job.status_code != 202:
        raise StackError(f"POST /v1/jobs answered {job.status_code}: {job.text[:500]}")
    job_id = job.json()["id"]
    listed = client.get("/v1/tasks", params={"job_id": job_id, "limit": 1000}).json()["data"]
    tiers = sorted({str(t["tier"]) for t in listed})
    expected = sum(1 for t in listed if t["tier"] == "light" and sampled(t["id"], setup.shadow_rate))
    reviews = progress.add_task(f"{QUALITY_TASK_TYPE} reviews ({', '.join(tiers)}, batch path)", total=len(listed))
    shadows = progress.add_task(f"shadow answers from {setup.complex_model}", total=expected)
    deadline = time.monotonic() + wait
    counts: dict[str, int] = {}
    row: dict[str, Any] | None = None
    shadowed = 0
    while True:
        body = client.get(f"/v1/jobs/{job_id}").json()
        counts = {str(k): int(v) for k, v in (body.get("counts") or {}).items() if v}
        done = sum(n for status, n in counts.items() if status in TERMINAL)
        shadowed = _shadow_calls(client, QUALITY_TASK_TYPE)
        row = _quality_row(client, QUALITY_TASK_TYPE)
        progress.update(reviews, completed=done)
        progress.update(shadows, completed=min(shadowed, expected))
        promoted = bool(row and any(e["action"] == "promote" for e in row["events"]))
        if (done == len(listed) and shadowed >= expected and promoted) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    events = [e for e in (row or {}).get("events", []) if e["action"] == "promote"]
    promotion = events[-1] if events else None
    after: dict[str, Any] | None = None
    if promotion is not None:  # what the rule does to the next task of that type (tier auto)
        created = client.post("/v1/tasks", json={
            "prompt": "Classify the sentiment of the customer review.\nLabels: positive, neutral, negative\n"
                      "Review: The strap broke on the first day.", "task_type": QUALITY_TASK_TYPE, "urgent": True})
        if created.status_code == 202:
            after = created.json()
            until = time.monotonic() + 15
            while after["status"] not in TERMINAL and time.monotonic() < until:
                time.sleep(0.3)
                after = client.get(f"/v1/tasks/{after['id']}").json()
    return {"task_type": QUALITY_TASK_TYPE, "job_id": job_id, "tasks": len(listed), "statuses": counts,
            "light_model": setup.light_model, "complex_model": setup.complex_model,
            "light_agreement": POOR_AGREEMENT, "shadow_rate": setup.shadow_rate, "min_samples": setup.min_samples,
            "promote_below": setup.promote_below, "shadow_expected": expected, "shadow_answers": shadowed,
            "promotion": promotion, "shadow_cost_usd": (row or {}).get("shadow_cost_usd"),
            "next_task": None if after is None else {
                "id": after["id"], "tier": after["tier"], "status": after["status"],
                "model": after.get("served_model") or after.get("model")}}


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


def promotion_line(event: dict[str, Any]) -> str:
    figures = event.get("figures") or {}
    agreement = figures.get("agreement")
    said = f"agreement {float(agreement):.1%}" if agreement is not None else "agreement -"
    below = figures.get("promote_below")
    return (f"promoted {event['task_type']}: {event.get('from_tier') or 'auto'} → {event['to_tier']} "
            f"({said} over {figures.get('samples')} comparisons"
            + (f", below {float(below):.0%}" if below is not None else "") + ")")


def print_quality_scene(console: Console, scene: dict[str, Any] | None, skipped: str | None) -> None:
    if scene is None:
        if skipped:
            console.print(f"[yellow]quality scene skipped: {skipped}[/]")
        return
    table = Table(show_header=False, box=None, padding=(0, 2),
                  title=f"quality monitor: {scene['task_type']} with a poor cheap model")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("setup", f"{scene['light_model']} agrees with {scene['complex_model']} on "
                           f"{scene['light_agreement']:.0%} of labels (simulator)")
    table.add_row("reviews", f"{scene['tasks']} through the batch path: "
                             + ", ".join(f"{n} {status}" for status, n in sorted(scene["statuses"].items())))
    table.add_row("shadowed", f"{scene['shadow_answers']} of {scene['shadow_expected']} sampled "
                              f"({scene['shadow_rate']:.0%}) answered by {scene['complex_model']}, "
                              f"${_amount(scene['shadow_cost_usd'] or 0)}")
    if scene["promotion"] is not None:
        table.add_row("event", f"[green]{promotion_line(scene['promotion'])}[/]")
    else:
        table.add_row("event", f"[yellow]no promotion within the wait (needs {scene['min_samples']} "
                               "comparisons)[/]")
    nxt = scene.get("next_task")
    if nxt is not None:
        table.add_row(f"next {scene['task_type']} task", f"tier {nxt['tier']}, {nxt['status']}"
                                                         + (f" on {nxt['model']}" if nxt.get("model") else ""))
    console.print(table)


def print_costs_by_mode(console: Console, costs: dict[str, Any] | None) -> None:
    if costs is None:
        return
    table = Table(title="this run's spend by mode (GET /v1/costs?group_by=mode)", header_style="bold",
                  show_footer=True)
    totals = costs["totals"]
    table.add_column("mode", footer="total")
    for name, key in (("requests", "requests"), ("cost USD", "cost_usd"), ("baseline USD", "baseline_cost_usd"),
                      ("savings USD", "savings_usd")):
        table.add_column(name, justify="right", footer=_amount(totals.get(key)))
    for row in costs["rows"]:
        if row["mode"] == "shadow":  # spend only: no baseline, no savings (tierbatch/costs/query.py)
            table.add_row("shadow (quality monitor)", str(row["requests"]), _amount(row["cost_usd"]), "-", "-")
        else:
            table.add_row(row["mode"], str(row["requests"]), _amount(row["cost_usd"]),
                          _amount(row["baseline_cost_usd"]), _amount(row["savings_usd"]))
    console.print(table)
    shadow = next((row for row in costs["rows"] if row["mode"] == "shadow"), None)
    if shadow is not None:
        total = _decimal(totals.get("cost_usd")) or Decimal(0)
        spent = _decimal(shadow["cost_usd"]) or Decimal(0)
        savings = _decimal(totals.get("savings_usd")) or Decimal(0)
        share = f", {spent * 100 / total:.1f}% of this run's spend" if total else ""
        console.print(f"shadow spend (quality monitor): ${_money(spent)} over {shadow['requests']} premium-model "
                      f"calls{share}; savings net of it: ${_money(savings - spent)}", highlight=False)


def _amount(value: Any) -> str:
    amount = _decimal(value)
    return "-" if amount is None else _money(amount)


# --- end quality scene -----------------------------------------------------------------------------------


# --- response cache: a repeated deterministic question costs nothing the second time -------------------

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
    kept = sum((_decimal(r["baseline_cost_usd"]) or Decimal(0) for r in cached), Decimal(0))
    table = Table(show_header=False, box=None, padding=(0, 2),
                  title="response cache: the same deterministic question again")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("first ask", f"{first['mode']} on {first['served_model']}, ${_amount(first['cost_usd'])}")
    table.add_row(f"{len(repeats)} repeats", f"{len(cached)} answered from the cache at $0 "
                  f"(baseline ${_money(kept)} kept, so the saving shows in every cost report)")
    console.print(table)


# --- end response cache ----------------------------------------------------------------------------------


def render_report(console: Console, report: dict[str, Any]) -> None:
    """The report for people: the workload, the schedule run, the quality scene, spend by mode."""
    print_report(console, report)
    print_schedule(console, report.get("schedule_run"))
    print_cache_scene(console, report.get("cache_scene"))
    print_quality_scene(console, report.get("quality_scene"), report.get("quality_scene_skipped"))
    print_costs_by_mode(console, report.get("costs_by_mode"))


def run_demo(data_dir: Path, api_port: int | None, simulator_port: int | None, concurrency: int,
             simulator: bool, wait: float, batch_wait: float, as_json: bool) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a file or a pipe: do not squeeze the table into 80 columns
    err = Console(stderr=True)
    tasks = sample_workload()
    try:
        stack = LocalStack(data_dir, api_port=api_port, simulator_port=simulator_port, concurrency=concurrency,
                           simulator=simulator, tenant_name="demo", config_overrides=DEMO_CONFIG_OVERRIDES,
                           console=err)
        with sigterm_as_interrupt(), stack as info:
            with httpx.Client(base_url=info.api_url, timeout=30) as admin:
                api_key = new_run_tenant(admin, info)
            setup = scene_setup(info)
            if isinstance(setup, SceneSetup):
                make_premium_the_reference(setup)
            err.print(f"stack up at {info.api_url}; submitting {len(tasks)} tasks")
            with httpx.Client(base_url=info.api_url, timeout=30,
                              headers={"Authorization": f"Bearer {api_key}"}) as client:
                submit(client, tasks)
                schedule_ids = start_schedule(client, err)  # scheduled classification
                started = time.monotonic()
                progress = Progress(TextColumn("{task.description}", justify="left"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), console=err, disable=as_json)
                with progress:
                    poll(client, tasks, wait, batch_wait, progress)
                schedule_run = wait_schedule_run(client, schedule_ids,
                                                 min(started + wait, time.monotonic() + batch_wait))
                cache_scene = run_cache_scene(client, batch_wait)  # response cache
                scene = None
                if isinstance(setup, SceneSetup):  # last: it makes the cheap model poor for a while
                    progress = Progress(TextColumn("{task.description}", justify="left"), BarColumn(),
                                        MofNCompleteColumn(), TimeElapsedColumn(), console=err, disable=as_json)
                    with progress:
                        scene = run_quality_scene(client, setup, wait, progress, err)
                    if scene["promotion"] is not None:
                        err.print(f"quality monitor: {promotion_line(scene['promotion'])}", highlight=False,
                                  soft_wrap=True)
                quality = quality_overview(client)
                costs = costs_by_mode(client)
            report = build_report(info, tasks)
            report["schedule_run"] = schedule_run
            report["cache_scene"] = cache_scene
            report["quality_scene"] = scene
            report["quality_scene_skipped"] = setup if isinstance(setup, str) else None
            report["quality"] = quality
            report["costs_by_mode"] = costs
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except (StackError, httpx.HTTPError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_report(out, report)
    return 0 if report["ok"] else 1
