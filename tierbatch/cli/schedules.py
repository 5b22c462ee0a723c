"""`tierbatch schedules add|list|run|disable`: scheduled classification over the HTTP API.

A schedule is named by its id or by its name. `add` builds the body from options (a file source) or
reads a whole JSON body with `--file` (any source, e.g. SQL); the webhook signing secret is printed
once. `run` starts a run now and, with `--wait`, follows it with a progress bar until it finishes.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierbatch.cli.jobs import CliError, api_client, error_text, request

TERMINAL_RUN = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class AddOptions:
    name: str | None
    cron: str | None
    timezone: str
    source: str | None
    source_format: str
    id_field: str
    text_field: str
    labels: str | None
    task_type: str | None
    tier: str | None
    urgent: bool
    system: str | None
    template: str | None
    sink: str | None
    webhook_url: str | None
    disabled: bool
    body_file: Path | None
    as_json: bool


def schedule_body(options: AddOptions) -> dict[str, Any]:
    """The `POST /v1/schedules` body: a JSON file, with the options given on top of it."""
    body: dict[str, Any] = {}
    if options.body_file is not None:
        try:
            loaded = json.loads(options.body_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CliError(f"--file {options.body_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"--file {options.body_file}: must hold a JSON object (a schedule)")
        body = loaded
    if options.name is not None:
        body["name"] = options.name
    if options.cron is not None:
        body["cron"] = options.cron
    body.setdefault("timezone", options.timezone)
    if options.disabled:
        body["enabled"] = False
    job = dict(body.get("job") or {})
    if options.labels is not None:
        job["labels"] = [label.strip() for label in options.labels.split(",") if label.strip()]
    for key, value in (("task_type", options.task_type), ("tier", options.tier), ("system", options.system),
                       ("template", options.template)):
        if value is not None:
            job[key] = value
    if options.urgent:
        job["urgent"] = True
    body["job"] = job
    if options.source is not None:
        # a path on the server, relative to the tenant's files directory: sent as given
        body["source"] = {"type": "file", "path": options.source,
                          "format": options.source_format, "id_field": options.id_field,
                          "text_field": options.text_field}
    if options.sink is not None:
        body["sink"] = {"type": "file", "path": options.sink}
    if options.webhook_url is not None:
        body["webhook_url"] = options.webhook_url
    for required in ("name", "cron", "source"):
        if required not in body:
            raise CliError(f"a schedule needs a {required} (give it as an option or in --file)")
    return body


def _checked(response: httpx.Response, expected: tuple[int, ...] = (200, 201, 202)) -> dict[str, Any]:
    if response.status_code not in expected:
        raise CliError(error_text(response))
    answer: dict[str, Any] = response.json()
    return answer


def all_schedules(client: httpx.Client) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    while True:
        page = _checked(request(client, "GET", "/v1/schedules", params=params))
        out += page["data"]
        if not page.get("has_more"):
            return out
        params["after"] = page["next"]


def resolve(client: httpx.Client, name_or_id: str) -> dict[str, Any]:
    """A schedule by id, else by name."""
    try:
        uuid.UUID(name_or_id)
    except ValueError:
        pass
    else:
        response = request(client, "GET", f"/v1/schedules/{name_or_id}")
        if response.status_code == 200:
            found: dict[str, Any] = response.json()
            return found
    for schedule in all_schedules(client):
        if schedule["name"] == name_or_id:
            return schedule
    raise CliError(f"no schedule named {name_or_id!r}")


def _source_text(source: dict[str, Any]) -> str:
    if source.get("type") == "sql":
        return f"sql {source.get('source')}"
    return str(source.get("path") or source.get("file_id"))


def schedules_table(schedules: list[dict[str, Any]]) -> Table:
    table = Table(title="schedules")
    for column in ("name", "cron", "timezone", "enabled", "source", "next fire", "id"):
        table.add_column(column)
    for s in schedules:
        table.add_row(s["name"], s["cron"], s["timezone"], "yes" if s["enabled"] else "no", _source_text(s["source"]),
                      s.get("next_fire_at") or "-", s["id"])
    return table


def run_table(run: dict[str, Any]) -> Table:
    table = Table(title=f"run {run['id']}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [("status", run["status"]), ("fire time", run["fire_time"]), ("trigger", run["trigger"]),
            ("tasks", str(run["task_count"])), ("skipped", str(run["skipped_count"])),
            ("job", run.get("job_id") or "-"), ("cost (USD)", run.get("cost_usd") or "-")]
    for label, count in (run.get("label_counts") or {}).items():
        rows.append((f"label {label}", str(count)))
    if run.get("counts"):
        rows.append(("failed items", str(run["counts"].get("failed", 0))))
    if run.get("sink_path"):
        rows.append(("sink", run["sink_path"]))
    if run.get("webhook"):
        rows.append(("webhook", run["webhook"]["status"]))
    if run.get("error"):
        rows.append(("error", f"[red]{run['error']}[/]"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def run_add(options: AddOptions, api_url: str, api_key: str | None) -> None:
    body = schedule_body(options)
    with api_client(api_url, api_key, timeout=60) as client:
        created = _checked(request(client, "POST", "/v1/schedules", json=body))
    if options.as_json:
        sys.stdout.write(json.dumps(created) + "\n")
        return
    console = Console()
    console.print(f"schedule [bold]{created['name']}[/] ({created['id']}) next fires at {created['next_fire_at']}")
    if created.get("webhook_url"):
        console.print(f"webhook signing secret: [green]{created['webhook_secret']}[/] (shown once)")


def run_list(as_json: bool, api_url: str, api_key: str | None) -> None:
    with api_client(api_url, api_key, timeout=60) as client:
        schedules = all_schedules(client)
    if as_json:
        sys.stdout.write(json.dumps({"data": schedules}) + "\n")
    else:
        Console().print(schedules_table(schedules))


def run_disable(name_or_id: str, as_json: bool, api_url: str, api_key: str | None) -> None:
    with api_client(api_url, api_key, timeout=60) as client:
        schedule = resolve(client, name_or_id)
        changed = _checked(request(client, "PATCH", f"/v1/schedules/{schedule['id']}", json={"enabled": False}))
    if as_json:
        sys.stdout.write(json.dumps(changed) + "\n")
    else:
        Console().print(f"schedule [bold]{changed['name']}[/] disabled")


def run_now(name_or_id: str, wait: bool, poll_seconds: float, timeout: float, as_json: bool, api_url: str,
            api_key: str | None) -> None:
    console = Console(stderr=as_json)
    with api_client(api_url, api_key, timeout=60) as client:
        schedule = resolve(client, name_or_id)
        run = _checked(request(client, "POST", f"/v1/schedules/{schedule['id']}/run"))
        if not as_json:
            console.print(f"run [bold]{run['id']}[/] of schedule {schedule['name']} started")
        if wait:
            run = follow(client, schedule["id"], run, console, poll_seconds, timeout)
    if as_json:
        sys.stdout.write(json.dumps(run) + "\n")
    else:
        console.print(run_table(run))
    if run["status"] == "failed":
        raise CliError(f"the run failed: {run.get('error')}")


def follow(client: httpx.Client, schedule_id: str, run: dict[str, Any], console: Console, poll_seconds: float,
           timeout: float) -> dict[str, Any]:
    """Poll the run (and its job's counts for the bar) until it has finished."""
    deadline = time.monotonic() + timeout
    path = f"/v1/schedules/{schedule_id}/runs/{run['id']}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("reading the source", total=None)
        while run["status"] not in TERMINAL_RUN:
            if time.monotonic() > deadline:
                raise CliError(f"the run has not finished after {timeout:.0f}s (still {run['phase']}); "
                               f"see {path}")
            time.sleep(poll_seconds)
            run = _checked(request(client, "GET", path))
            job_id = run.get("retry_job_id") or run.get("job_id")
            if job_id:
                job = _checked(request(client, "GET", f"/v1/jobs/{job_id}"))
                done = sum(n for status, n in job["counts"].items() if status in ("succeeded", "failed", "cancelled"))
                progress.update(bar, description="classifying" if run["phase"] != "retrying" else "retrying",
                                total=job["task_count"], completed=done)
    return run
