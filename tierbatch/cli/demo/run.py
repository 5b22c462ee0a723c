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

With `--open-model` the light tier is a real open model (tierbatch.cli.stack.open_model: llama-server with
SmolLM2-135M, priced at the operator's compute cost per token) and the premium tier stays on the
simulator; the non-urgent light tasks go through the bounded background lane (no Batch API), the report
shows the open model's answers and token counts beside the premium tier's, and the quality scene (which
needs the simulator's cheap model) is left out.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tierbatch.cli.demo.cache_scene import run_cache_scene
from tierbatch.cli.demo.quality_scene import (
    DEMO_QUALITY,
    QUALITY_TASK_TYPE,
    SceneSetup,
    make_premium_the_reference,
    promotion_line,
    run_quality_scene,
    scene_setup,
)
from tierbatch.cli.demo.report import (
    build_report,
    costs_by_mode,
    open_model_summary,
    quality_overview,
    render_report,
)
from tierbatch.cli.demo.schedule import start_schedule, wait_schedule_run
from tierbatch.cli.demo.workload import poll, sample_workload, submit
from tierbatch.cli.stack.local_stack import LocalStack, StackError, StackInfo
from tierbatch.cli.stack.signals import sigterm_as_interrupt

# For the demo's generated config: assemble and poll batches quickly, so batch tasks can finish in the wait.
DEMO_CONFIG_OVERRIDES: dict[str, Any] = {"batch": {"max_wait_seconds": 5, "poll_interval_seconds": 2},
                                         "routing": {QUALITY_TASK_TYPE: "light"}, "quality": DEMO_QUALITY}


OPEN_MODEL_NO_SCENE = "--open-model: the light tier is the open model, not the simulator's cheap model"


def new_run_tenant(client: httpx.Client, info: StackInfo) -> str:
    """A tenant for this run (admin API): fresh routing rules, and cost figures of this run only."""
    name = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    response = client.post("/v1/admin/tenants", json={"name": name},
                           headers={"Authorization": f"Bearer {info.admin_token}"})
    if response.status_code != 201:
        raise StackError(f"POST /v1/admin/tenants answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["api_key"])


def run_demo(data_dir: Path, api_port: int | None, simulator_port: int | None, concurrency: int,
             simulator: bool, wait: float, batch_wait: float, as_json: bool, open_model: bool = False) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a file or a pipe: do not squeeze the table into 80 columns
    err = Console(stderr=True)
    tasks = sample_workload()
    try:
        stack = LocalStack(data_dir, api_port=api_port, simulator_port=simulator_port, concurrency=concurrency,
                           simulator=simulator, tenant_name="demo", config_overrides=DEMO_CONFIG_OVERRIDES,
                           console=err, open_model=open_model)
        with sigterm_as_interrupt(), stack as info:
            with httpx.Client(base_url=info.api_url, timeout=30) as admin:
                api_key = new_run_tenant(admin, info)
            setup = OPEN_MODEL_NO_SCENE if open_model else scene_setup(info)
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
            report["open_model"] = open_model_summary(info) if open_model else None
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
