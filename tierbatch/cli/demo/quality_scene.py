"""The demo's quality scene: a poor cheap model, its task type promoted, shadow spend on its own line.

The simulator's cheap model is made to agree poorly with the premium one (`POST /_sim/config`), a batch
of `sentiment` reviews goes through a provider batch, the quality monitor shadows a sample of them on
the premium model and promotes `sentiment` to complex.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.orm import Session

from tierbatch.base.config import load_config
from tierbatch.base.states import TERMINAL_TASK_STATUSES as TERMINAL
from tierbatch.cli.demo.money import amount
from tierbatch.cli.demo.workload import SENTIMENT_LABELS
from tierbatch.cli.stack.local_stack import StackError, StackInfo
from tierbatch.db.engine import make_engine
from tierbatch.quality.monitor import sample_points, sampled

# quality scene: a task type whose cheap model agrees poorly with the premium one
QUALITY_TASK_TYPE = "sentiment"
QUALITY_ITEMS = 240  # about 48 shadowed at 20%; fewer than the 20 that decide: about 2 in 10 million
POOR_AGREEMENT = 0.5  # the simulator's share of the cheap model's labels equal to the premium model's
# Quality settings that decide within one small batch: 20% of Light tasks shadowed, a verdict after 20
# comparisons. The main workload stays far from that (about 10 classification comparisons, at the
# simulator's usual 95% agreement), so only the scene's task type moves.
DEMO_QUALITY: dict[str, Any] = {"shadow_rate": 0.2, "min_samples": 20, "window": 50}

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
    database_url: str  # the demo's own database: which tasks the monitor samples is read from it


def scene_setup(info: StackInfo) -> SceneSetup | str:
    """The scene's setup, or why it cannot run (it needs the simulator and the demo's generated config)."""
    if info.simulator_url is None:
        return "no simulator (TIERBATCH_CONFIG names the providers)"
    if os.environ.get("TIERBATCH_CONFIG"):
        return "TIERBATCH_CONFIG is set: the demo's quality settings do not apply"
    config = load_config(info.config_path)
    return SceneSetup(info.simulator_url, config.tiers["light"].model, config.tiers["complex"].model,
                      config.quality.shadow_rate, config.quality.min_samples, config.quality.promote_below,
                      info.database_url)


def _sampled_light_tasks(setup: SceneSetup, task_ids: list[uuid.UUID]) -> int:
    """How many of these light tasks the quality monitor will shadow: its draw is a hash of each stored
    request, computed by Postgres, so it is read with the monitor's own query."""
    engine = make_engine(setup.database_url, pool_size=1)
    try:
        with Session(engine) as session:
            points = sample_points(session, task_ids)
    finally:
        engine.dispose()
    return sum(1 for point in points.values() if sampled(point.shadow, setup.shadow_rate))


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
    expected = _sampled_light_tasks(setup, [uuid.UUID(t["id"]) for t in listed if t["tier"] == "light"])
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
                              f"${amount(scene['shadow_cost_usd'] or 0)}")
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
