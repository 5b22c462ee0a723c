"""What routing, batching, caching and the quality monitor save on the reference workload, beside the
all-premium baseline and the floor any router could reach on the same tokens.

    .venv/bin/python bench/savings.py                          # 100,000 tasks over 5 days (minutes)
    .venv/bin/python bench/savings.py --tasks 10000            # a smaller run
    .venv/bin/python bench/savings.py --figures-json a.json    # the figures, for diffing two runs

The workload (bench/savings_workload.py, described in bench/README.md) is generated from `--seed` and
submitted the ways users submit: nightly schedule runs, bulk jobs, OpenAI batch files, single tasks
(urgent, or with a deadline) and OpenAI-compatible chat calls, on one tenant, against a simulator whose
light model agrees with the reference (premium) model at a stated rate per task type. The quality
monitor runs with its production defaults; every task type starts on the light tier.

Sequencing makes the figures reproducible: a day's work is submitted while no worker runs (so every
routing decision of the day reads the rules as the previous day left them), then the workers and beat
process it until every task, shadow and comparison of the day is done, and stop. The sample of
shadowed tasks is drawn from each request's hash, repeats come from earlier days only, and the
provider's prompt cache is sized to forget nothing and warmed (day 0) before a shared prefix is used.

Figures, all from this run's ledger and the simulator's own record of which answers were the reference
model's:
- baseline: every served task's tokens at the premium model's immediate price (the ledger's baseline);
- actual: the ledger's cost, shadow and probe calls included;
- floor: every task on the cheapest tier whose agreement (the simulator's stated rate) meets
  `[quality] promote_below`, at the batch price unless its producer wanted it now, repeats of an
  earlier deterministic request free, the same tokens as served;
- agreement: the share of served answers equal to the reference model's, over every task;
- the audit: `tierbatch audit` on the baseline calls (every served task as a premium immediate call).

Every process is stopped and the scratch database dropped at the end. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
import psycopg
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import delete_redis_keys
from bench.savings_workload import (
    DEADLINE_HOURS,
    FAMILIES,
    FAMILY_BY_NAME,
    LATER_HOURS,
    Day,
    Item,
    instructions,
    prompt_cache_entries_bound,
    sim_family_tables,
    warm_up,
)
from bench.savings_workload import generate as generate_workload
from tests.support.procs import REPO_ROOT, ManagedProcess, free_port, python_module
from tests.support.stack import SECRET_KEY, Stack, psycopg_dsn, scratch_database, simulator_tiers
from tierbatch.base.config import AppConfig, load_config
from tierbatch.base.settings import DEFAULT_DATABASE_URL
from tierbatch.base.states import LIVE_TASK_STATUSES, Tier, sql_in
from tierbatch.db.engine import make_engine, make_session_factory
from tierbatch.db.models import RoutingRule
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.migrations.runner import upgrade_to_head
from tierbatch.quality.monitor import sample_points, shadow_tier_for
from tierbatch.tasks.labels import label_response_format

CENT = Decimal("0.01")
TARGET_SAVING_PCT = Decimal(90)
TARGET_AGREEMENT_PCT = Decimal(95)
TARGET_FLOOR_GAP_PP = Decimal(1)
GATEWAY_POLICY_TTL_SECONDS = 5.0  # tierbatch/gateway/policies.py: how long the API remembers a tenant's rules
JOB_CHUNK_ITEMS = 10_000
TASKS_PER_REQUEST = 1_000
LIVE = sql_in(LIVE_TASK_STATUSES)
LIGHT, COMPLEX = "gpt-4o-mini", "gpt-4o"


def say(message: str) -> None:
    print(message, flush=True)


# --- configuration ---------------------------------------------------------------------------------------


def app_config_text(simulator_port: int, files_root: Path) -> str:
    """Production defaults but for the batch timers (a simulated batch takes a fraction of a second), the
    reconciler and the routing: every task type of the workload starts on the light tier.

    The reconciler recovers from crashes, and nothing crashes here; a day's backlog takes minutes to drain,
    and with the default staleness (60 s) it re-sends the message of every task still queued every 15 s,
    which only adds work (twice the immediate-call messages over a 100,000-task run; the same figures)."""
    routing = "\n".join(f'{family.name} = "light"' for family in FAMILIES)
    return f"""
{simulator_tiers(simulator_port)}

[routing]
{routing}

[batch]
max_wait_seconds = 1
poll_interval_seconds = 0.5
assemble_interval_seconds = 0.5

[reconciler]
queued_stale_seconds = 1800
batch_stale_seconds = 1800

[files]
root = "{files_root}"
"""


def simulator_config(prompt_cache_entries: int) -> dict[str, Any]:
    agreement, lengths = sim_family_tables()
    return {
        "record_verdicts": True,
        "prompt_cache_entries": prompt_cache_entries,
        "batch": {"validating_seconds": 0.05, "in_progress_seconds": 0.05, "finalizing_seconds": 0.05,
                  "line_error_rate": 0.0, "expire": False, "enqueued_token_limit": 0},
        "models": {"*": {"latency_ms": [1, 3], "error_rate": 0.0, "slow_rate": 0.0,
                         "output_tokens_by_family": lengths},
                   COMPLEX: {"reference": True},
                   LIGHT: {"agreement_by_family": agreement}},
    }


# --- the stack ---------------------------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (0 for one that is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class CpuAccount:
    """CPU seconds the run used, by process: what the wall time would need on idle cores."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def add_process(self, name: str, process: ManagedProcess) -> None:
        self.seconds[name] += tree_cpu_seconds(process.pid)

    def add_backends(self, conn: psycopg.Connection[Any], database: str) -> None:
        """The Postgres backends serving the run's database now (the workers' pools keep theirs open)."""
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (database,)).fetchall()
        self.seconds["postgres backends"] += sum(tree_cpu_seconds(int(pid)) for (pid,) in rows)


class Processes:
    """Simulator and API for the whole run; the workers and beat started and stopped around each day's work."""

    def __init__(self, stack: Stack, workers: int, concurrency: int, pool: str) -> None:
        self.stack = stack
        self.workers = workers
        self.concurrency = concurrency
        self.pool = pool
        self.running: list[ManagedProcess] = []
        self.stopped_at = time.monotonic()
        self.cpu = CpuAccount()

    def start_workers(self) -> None:
        for _ in range(self.workers):
            worker = self.stack._start("worker", python_module("tierbatch.cli", "worker", "--concurrency",
                                                               str(self.concurrency), "--pool", self.pool))
            self.running.append(worker)
        deadline = time.monotonic() + 120
        while not all("ready." in worker.log_text() for worker in self.running):
            if not all(worker.alive() for worker in self.running) or time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not start:\n{self.running[-1].log_text()}")
            time.sleep(0.1)
        self.stack.start_beat()
        self.running.append(self.stack.processes["beat"])

    def stop_workers(self, conn: psycopg.Connection[Any] | None = None) -> None:
        if conn is not None:
            self.cpu.add_backends(conn, make_url(self.stack.database_url).database or "")
        for process in reversed(self.running):  # beat first: no tick sent to a worker going away
            self.cpu.add_process("beat" if process is self.stack.processes.get("beat") else "workers", process)
            process.stop(timeout=30)
        self.running.clear()
        self.stopped_at = time.monotonic()

    def rules_settled(self) -> None:
        """Wait until the API's remembered rules are at least as new as the worker's last change."""
        left = GATEWAY_POLICY_TTL_SECONDS + 1 - (time.monotonic() - self.stopped_at)
        if left > 0:
            time.sleep(left)


# --- submitting a day ------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    """What a phase sent, to wait for it and to join tasks back to the workload."""

    started_db: datetime
    gateway_tasks: dict[str, str] = field(default_factory=dict)  # task id -> item key
    schedule_run: str | None = None  # the run's path under /v1/schedules
    client_batch: str | None = None
    seconds: float = 0.0


def post(client: httpx.Client, path: str, expected: int = 202, **kwargs: Any) -> dict[str, Any]:
    response = client.post(path, **kwargs)
    if response.status_code != expected:
        raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def job_bodies(day: Day) -> Iterator[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in day.by_path("job"):
        groups[item.family, item.system].append(item)
    for variant, ((name, system), items) in enumerate(groups.items()):
        family = FAMILY_BY_NAME[name]
        params = family.params  # a job's `labels` ask for the label format themselves
        for start in range(0, len(items), JOB_CHUNK_ITEMS):
            chunk = items[start:start + JOB_CHUNK_ITEMS]
            body: dict[str, Any] = {"name": f"day{day.number}-{name}-{variant}", "task_type": name, "urgent": False,
                                    "system": system, "template": family.template, "params": params,
                                    "items": [{"id": item.key, "text": item.text} for item in chunk]}
            if family.labels is not None:
                body["labels"] = list(family.labels)
            yield body


def task_body(item: Item, now: datetime) -> dict[str, Any]:
    family = FAMILY_BY_NAME[item.family]
    params = dict(family.params)
    if family.labels is not None:  # as a job with `labels` asks for them
        params["response_format"] = label_response_format(family.labels)
    body: dict[str, Any] = {"messages": item.messages(), "task_type": item.family, "urgent": item.urgent,
                            "params": params, "idempotency_key": item.key, "tier": item.tier or "auto"}
    hours = {"deadline": DEADLINE_HOURS, "later": LATER_HOURS}.get(item.path)
    if hours is not None:
        body["deadline"] = (now + timedelta(hours=hours)).isoformat()
    return body


def batch_file(items: Sequence[Item]) -> bytes:
    out = io.StringIO()
    for item in items:
        family = FAMILY_BY_NAME[item.family]
        body = {"model": "smart-select", "messages": item.messages(), **family.params,
                "metadata": {"task_type": item.family}}
        out.write(json.dumps({"custom_id": item.key, "method": "POST", "url": "/v1/chat/completions",
                              "body": body}, ensure_ascii=False) + "\n")
    return out.getvalue().encode()


def gateway_calls(stack: Stack, key: str, items: Sequence[Item], clients: int) -> dict[str, str]:
    """Each item as one `smart-select` chat call, `clients` at a time; task id -> item key."""
    local = threading.local()

    def call(item: Item) -> tuple[str, str]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=stack.api_url, timeout=120,
                                                 headers={"Authorization": f"Bearer {key}"})
        family = FAMILY_BY_NAME[item.family]
        body = {"model": "smart-select", "messages": item.messages(), "temperature": family.temperature,
                "metadata": {"task_type": item.family}}
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"chat call {item.key} answered {response.status_code}: {response.text[:300]}")
        return response.headers["x-tierbatch-task-id"], item.key

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        return dict(pool.map(call, items))


def submit_day(stack: Stack, processes: Processes, client: httpx.Client, key: str, tenant_home: Path,
               schedule_id: str, day: Day, conn: psycopg.Connection[Any], gateway_clients: int) -> Submitted:
    started = time.perf_counter()
    submitted = Submitted(started_db=db_now(conn))
    for body in job_bodies(day):
        post(client, "/v1/jobs", json=body)
    batch_items = day.by_path("openai_batch")
    if batch_items:
        uploaded = post(client, "/v1/files", expected=200, data={"purpose": "batch"},
                        files={"file": (f"day{day.number}.jsonl", batch_file(batch_items), "application/jsonl")})
        created = post(client, "/v1/batches", expected=200, json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        submitted.client_batch = str(created["id"])
    now = datetime.now(UTC)
    singles = [item for item in day.items if item.path in ("urgent", "deadline", "later")]
    for start in range(0, len(singles), TASKS_PER_REQUEST):
        post(client, "/v1/tasks", json={"tasks": [task_body(item, now) for item in
                                                  singles[start:start + TASKS_PER_REQUEST]]})
    tickets = day.by_path("schedule")
    if tickets:
        folder = tenant_home / "tickets"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"day{day.number}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "body"])
            writer.writerows([item.key, item.text] for item in tickets)
        run_id = post(client, f"/v1/schedules/{schedule_id}/run")["id"]
        submitted.schedule_run = f"/v1/schedules/{schedule_id}/runs/{run_id}"
    calls = day.by_path("gateway")
    if calls:
        processes.rules_settled()
        submitted.gateway_tasks = gateway_calls(stack, key, calls, gateway_clients)
    submitted.seconds = time.perf_counter() - started
    return submitted


def create_schedule(client: httpx.Client, seed: int) -> str:
    family = FAMILY_BY_NAME["classification"]
    assert family.labels is not None
    job = {"task_type": family.name, "tier": "auto", "urgent": False, "system": instructions(seed)[family.name, False],
           "template": family.template, "labels": list(family.labels), "params": {"temperature": family.temperature}}
    created = post(client, "/v1/schedules", expected=201, json={
        "name": "nightly-tickets", "cron": "0 2 * * *", "timezone": "UTC", "enabled": False, "job": job,
        "source": {"type": "file", "path": "tickets/*.csv", "format": "csv", "id_field": "id", "text_field": "body"}})
    return str(created["id"])


# --- waiting for a day -------------------------------------------------------------------------------------------


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def scalar(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def expected_comparisons(ctx: Context, tenant: uuid.UUID, submitted: Submitted,
                         rules: dict[str, RoutingRule]) -> int:
    """How many comparisons the day's finished tasks make (gateway calls included), by the quality
    monitor's own draw."""
    with ctx.sessions() as session:
        rows = session.execute(
            _FINISHED_SERVED, {"tenant": tenant, "since": submitted.started_db}).all()
        candidates = [(task_id, Tier(tier), task_type) for task_id, tier, task_type in rows]
        points = sample_points(session, [task_id for task_id, _, _ in candidates])
    return sum(1 for task_id, tier, task_type in candidates
               if shadow_tier_for(ctx.config, tier, rules.get(task_type), points[task_id]) is not None)


def day_settled(ctx: Context, conn: psycopg.Connection[Any], client: httpx.Client, tenant: uuid.UUID,
                submitted: Submitted, timeout: float, stall_seconds: float) -> float:
    """Wait until every task of the day (shadow tasks too) is finished, the schedule run and the client
    batch are done and every comparison the monitor draws is recorded; seconds taken."""
    started = time.perf_counter()
    rules = rules_of(ctx, tenant)
    expected: int | None = None
    last_print = 0.0
    seen: tuple[int, int] | None = None
    moved_at = started
    while True:
        elapsed = time.perf_counter() - started
        live = int(scalar(conn, f"SELECT count(*) FROM tasks WHERE tenant_id = %s AND status IN {LIVE}", tenant))
        run_done = submitted.schedule_run is None or \
            client.get(submitted.schedule_run).json()["status"] in ("succeeded", "failed")
        batch_done = submitted.client_batch is None or client.get(
            f"/v1/batches/{submitted.client_batch}").json()["status"] in ("completed", "failed", "expired", "cancelled")
        compared = int(scalar(conn, "SELECT count(*) FROM quality_comparisons WHERE tenant_id = %s "
                                    "AND created_at >= %s", tenant, submitted.started_db))
        if live == 0 and run_done and batch_done:
            if expected is None:
                expected = expected_comparisons(ctx, tenant, submitted, rules)
            if compared >= expected:
                return time.perf_counter() - started
        if elapsed - last_print >= 15:
            last_print = elapsed
            say(f"    {elapsed:5.0f}s: {live:,} live tasks, {compared:,} comparisons"
                + (f" of {expected:,}" if expected is not None else "")
                + ("" if run_done else ", schedule run going") + ("" if batch_done else ", client batch going"))
        if (live, compared) != seen:
            seen, moved_at = (live, compared), time.perf_counter()
        elif time.perf_counter() - moved_at > stall_seconds:
            stuck = conn.execute(f"SELECT status::text, task_type, count(*) FROM tasks WHERE tenant_id = %s "
                                 f"AND status IN {LIVE} GROUP BY 1, 2", (tenant,)).fetchall()
            raise RuntimeError(f"no progress for {stall_seconds:.0f}s: live tasks {stuck}, {compared} comparisons "
                               f"(expected {expected}); see the worker logs")
        if elapsed > timeout:
            raise TimeoutError(f"the day did not settle in {timeout:.0f}s: {live} live tasks, {compared} "
                               f"comparisons (expected {expected}), run done {run_done}, batch done {batch_done}")
        time.sleep(0.5)


# the day's tasks served by a provider call (a cache hit is never shadowed), shadow tasks aside
_FINISHED_SERVED = text(
    "SELECT id, tier::text, task_type FROM tasks WHERE tenant_id = :tenant AND created_at >= :since "
    "AND shadow_of IS NULL AND status = 'succeeded' AND mode IN ('immediate', 'batch')")


@dataclass
class Context:
    config: AppConfig
    sessions: sessionmaker[Session]


def rules_of(ctx: Context, tenant: uuid.UUID) -> dict[str, RoutingRule]:
    with ctx.sessions() as session:
        rules = list(session.scalars(select(RoutingRule).where(RoutingRule.tenant_id == tenant)))
        session.expunge_all()
    return {rule.task_type: rule for rule in rules}


# --- figures ------------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """One workload task as tierbatch served it, priced three ways."""

    key: str
    family: str
    path: str
    urgent: bool
    repeat: bool
    tier: str
    mode: str
    usage: TokenUsage
    cost: Decimal
    baseline: Decimal
    floor: Decimal
    floor_tier: str
    agreed: bool | None
    shadow_cost: Decimal = Decimal(0)
    probe_cost: Decimal = Decimal(0)


def floor_tier(config: AppConfig, family: str) -> Literal["light", "complex"]:
    """The cheapest tier whose stated agreement meets the monitor's threshold (the complex model is the
    reference: it always does)."""
    return "light" if FAMILY_BY_NAME[family].light_agreement >= config.quality.promote_below else "complex"


def collect(ctx: Context, conn: psycopg.Connection[Any], tenant: uuid.UUID, items: dict[str, Item],
            gateway_tasks: dict[str, str], verdicts: dict[str, bool]) -> list[Served]:
    prices = PriceBook(ctx.config)
    rows = conn.execute(
        "SELECT t.id::text, t.item_id, t.idempotency_key, t.task_type, t.tier::text, l.mode::text, "
        "       l.input_tokens, l.cached_tokens, "
        "       l.cache_write_tokens, l.output_tokens, l.reasoning_tokens, l.cost_usd, l.baseline_cost_usd, "
        "       t.response->>'id', t.status::text "
        "FROM tasks t LEFT JOIN ledger_entries l ON l.task_id = t.id AND l.mode <> 'shadow' "
        "WHERE t.tenant_id = %s AND t.shadow_of IS NULL", (tenant,)).fetchall()
    shadows = conn.execute(
        "SELECT l.task_id::text, l.tier::text, sum(l.cost_usd) FROM ledger_entries l "
        "WHERE l.tenant_id = %s AND l.mode = 'shadow' GROUP BY 1, 2", (tenant,)).fetchall()
    extra: dict[tuple[str, str], Decimal] = {(task_id, tier): Decimal(cost) for task_id, tier, cost in shadows}
    served: list[Served] = []
    for (task_id, item_id, idem, task_type, tier, mode, input_tokens, cached, cache_write, output_tokens,
         reasoning, cost, baseline, answer_id, status) in rows:
        key = item_id or idem or gateway_tasks.get(task_id)
        if key is None or key not in items:
            raise RuntimeError(f"task {task_id} ({task_type}) is not a workload item")
        if status != "succeeded" or mode is None:
            raise RuntimeError(f"task {task_id} ({key}) ended {status} without a billed answer")
        item = items[key]
        usage = TokenUsage(int(input_tokens), int(cached), int(output_tokens), int(reasoning), int(cache_write))
        tier_floor = floor_tier(ctx.config, item.family)
        ref = ctx.config.tiers[tier_floor]
        floor = Decimal(0)
        if item.repeat_of is None:
            priced = prices.price(ref.provider, ref.model, ref.model, usage, batch=not item.urgent)
            assert priced is not None
            floor = priced.total
        served.append(Served(
            key=key, family=item.family, path=item.path, urgent=item.urgent, repeat=item.repeat_of is not None,
            tier=tier, mode=mode, usage=usage, cost=Decimal(cost),
            baseline=Decimal(baseline), floor=floor, floor_tier=tier_floor,
            agreed=verdicts.get(answer_id) if answer_id else None,
            shadow_cost=extra.get((task_id, "complex"), Decimal(0)) if tier == "light" else Decimal(0),
            probe_cost=extra.get((task_id, "light"), Decimal(0)) if tier == "complex" else Decimal(0)))
        # a shadow row carries the shadow's tier: light tasks are shadowed on complex, complex ones probed on light
        if (tier == "light" and (task_id, "light") in extra) or (tier == "complex" and (task_id, "complex") in extra):
            raise RuntimeError(f"task {task_id}: a shadow row on its own tier")
    if len(served) != len(items):
        raise RuntimeError(f"{len(served):,} tasks served for {len(items):,} workload items")
    return served


def pct(part: Decimal, whole: Decimal) -> Decimal:
    return (part * 100 / whole).quantize(Decimal("0.01")) if whole else Decimal(0)


def money(value: Decimal) -> str:
    return f"${value.quantize(CENT):,}"


@dataclass
class Totals:
    tasks: int = 0
    baseline: Decimal = Decimal(0)
    cost: Decimal = Decimal(0)
    shadow: Decimal = Decimal(0)
    probe: Decimal = Decimal(0)
    floor: Decimal = Decimal(0)
    agreed: int = 0
    judged: int = 0

    def add(self, s: Served) -> None:
        self.tasks += 1
        self.baseline += s.baseline
        self.cost += s.cost
        self.shadow += s.shadow_cost
        self.probe += s.probe_cost
        self.floor += s.floor
        if s.agreed is not None:
            self.judged += 1
            self.agreed += s.agreed

    @property
    def actual(self) -> Decimal:
        return self.cost + self.shadow + self.probe

    def figures(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "baseline_usd": str(self.baseline), "actual_usd": str(self.actual),
                "served_usd": str(self.cost), "shadow_usd": str(self.shadow), "probe_usd": str(self.probe),
                "floor_usd": str(self.floor), "saving_pct": str(pct(self.baseline - self.actual, self.baseline)),
                "floor_saving_pct": str(pct(self.baseline - self.floor, self.baseline)),
                "agreement_pct": str(pct(Decimal(self.agreed), Decimal(self.judged))), "judged": self.judged}


GAP_CAUSES = (
    ("shadow", "shadow calls (light answers re-run on the premium model)"),
    ("probe", "probe calls (promoted types' answers re-run on the light model)"),
    ("complex_immediate", "non-urgent tasks on the premium tier served immediately (no batch path for it)"),
    ("light_immediate", "non-urgent light tasks served immediately (deadline too near for a batch)"),
    ("lag", "tasks served light before their type was promoted (promotion lag)"),
    ("over_promotion", "tasks served on the premium tier although the light one meets the threshold"),
    ("uncached_repeat", "repeats the response cache did not answer"),
    ("other", "same tier and mode as the floor"),
)


def gap_cause(s: Served) -> str:
    if s.repeat and s.mode != "cache":
        return "uncached_repeat"
    if s.tier != s.floor_tier:
        return "lag" if s.tier == "light" else "over_promotion"
    if s.mode == "immediate" and not s.urgent:
        return "complex_immediate" if s.tier == "complex" else "light_immediate"
    return "other"


def figures_of(served: Sequence[Served]) -> dict[str, Any]:
    total = Totals()
    by_type: dict[str, Totals] = defaultdict(Totals)
    by_path: dict[str, Totals] = defaultdict(Totals)
    served_as: dict[str, Counter[str]] = defaultdict(Counter)
    gap: dict[str, list[Any]] = {name: [0, Decimal(0), 0, 0] for name, _ in GAP_CAUSES}  # tasks, USD, agreed, judged
    for s in served:
        total.add(s)
        by_type[s.family].add(s)
        by_path[s.path].add(s)
        served_as[s.family][s.mode if s.mode == "cache" else f"{s.tier} {s.mode}"] += 1
        cause = gap_cause(s)
        gap[cause][0] += 1
        gap[cause][1] += s.cost - s.floor
        if s.agreed is not None:
            gap[cause][2] += s.agreed
            gap[cause][3] += 1
        for name, value in (("shadow", s.shadow_cost), ("probe", s.probe_cost)):
            if value:
                gap[name][0] += 1
                gap[name][1] += value
    saving = pct(total.baseline - total.actual, total.baseline)
    floor_saving = pct(total.baseline - total.floor, total.baseline)
    return {
        "totals": total.figures(),
        "share_of_floor_saving_pct": str(pct(total.baseline - total.actual, total.baseline - total.floor)),
        "floor_gap_pp": str(floor_saving - saving),
        "by_type": {name: {**by_type[name].figures(), "served_as": dict(sorted(served_as[name].items()))}
                    for name in [f.name for f in FAMILIES] if name in by_type},
        "by_path": {name: by_path[name].figures() for name in sorted(by_path)},
        "gap": {name: {"tasks": count, "usd": str(value), "pp_of_baseline": str(pct(value, total.baseline)),
                       "agreement_pct": str(pct(Decimal(agreed), Decimal(judged))) if judged else None}
                for name, (count, value, agreed, judged) in gap.items()},
    }


def ledger_by_mode(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT mode::text, tier::text, count(*), sum(cost_usd), sum(baseline_cost_usd) "
                        "FROM ledger_entries WHERE tenant_id = %s GROUP BY 1, 2 ORDER BY 1, 2", (tenant,)).fetchall()
    return {f"{mode} {tier}": {"requests": int(n), "cost_usd": str(cost), "baseline_usd": str(baseline)}
            for mode, tier, n, cost, baseline in rows}


def routing_events(conn: psycopg.Connection[Any], tenant: uuid.UUID,
                   day_starts: list[tuple[int, datetime]]) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT created_at, task_type, action, from_tier::text, to_tier::text, figures "
                        "FROM routing_events WHERE tenant_id = %s AND actor = 'quality' ORDER BY created_at",
                        (tenant,)).fetchall()
    events = []
    for created, task_type, action, before, after, figures in rows:
        day = max((number for number, start in day_starts if start <= created), default=0)
        events.append({"day": day, "task_type": task_type, "action": action, "from": before, "to": after,
                       "window": figures})
    return events


def monitor_agreement(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> dict[str, dict[str, int]]:
    rows = conn.execute("SELECT task_type, shadow_tier::text, count(*) FILTER (WHERE agreed IS NOT NULL), "
                        "count(*) FILTER (WHERE agreed) FROM quality_comparisons WHERE tenant_id = %s GROUP BY 1, 2",
                        (tenant,)).fetchall()
    return {f"{task_type} ({'shadow' if shadow == 'complex' else 'probe'})": {"compared": int(n), "agreed": int(a)}
            for task_type, shadow, n, a in rows}


# --- the audit ----------------------------------------------------------------------------------------------------


def audit_baseline(conn: psycopg.Connection[Any], tenant: uuid.UUID, config_path: Path, workdir: Path,
                   non_urgent_share: Decimal, cpu: CpuAccount) -> dict[str, Any]:
    """`tierbatch audit` on every served task as a premium immediate call: its request, and the tokens it
    took, as a call log would hold them."""
    log_path = workdir / "baseline-calls.jsonl"
    with log_path.open("w") as out, conn.transaction(), conn.cursor(name="baseline_calls") as cursor:
        cursor.itersize = 2000
        cursor.execute(
            "SELECT t.task_type, t.request, l.input_tokens, l.cached_tokens, l.output_tokens, l.reasoning_tokens, "
            "       extract(epoch FROM t.created_at)::bigint "
            "FROM tasks t JOIN ledger_entries l ON l.task_id = t.id AND l.mode <> 'shadow' "
            "WHERE t.tenant_id = %s AND t.shadow_of IS NULL ORDER BY t.created_at, t.id", (tenant,))
        for task_type, request, input_tokens, cached, output_tokens, reasoning, created in cursor:
            call = {"request": {**request, "model": COMPLEX, "metadata": {"task_type": task_type}},
                    "response": {"model": COMPLEX, "created": created, "usage": {
                        "prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                        "prompt_tokens_details": {"cached_tokens": cached},
                        "completion_tokens_details": {"reasoning_tokens": reasoning}}}}
            out.write(json.dumps(call, ensure_ascii=False) + "\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(python_module("tierbatch.cli", "audit", str(log_path), "--config", str(config_path),
                                          "--non-urgent-share", str(non_urgent_share), "--json"),
                            capture_output=True, text=True, cwd=REPO_ROOT, check=False, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.seconds["tierbatch audit"] += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise RuntimeError(f"tierbatch audit failed ({result.returncode}): {result.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    log_path.unlink()
    return report


# --- the report ---------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[bold red]missed[/bold red]"


def report(figures: dict[str, Any], run: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(170, shutil.get_terminal_size((170, 40)).columns))
    totals = figures["totals"]
    baseline, actual, floor = (Decimal(totals[k]) for k in ("baseline_usd", "actual_usd", "floor_usd"))
    saving, floor_saving = Decimal(totals["saving_pct"]), Decimal(totals["floor_saving_pct"])
    agreement = Decimal(totals["agreement_pct"])
    audit = figures["audit"]
    workload = figures["workload"]
    head = Table(title=f"tierbatch savings: reference workload, seed {workload['seed']}, {workload['tasks']:,} tasks "
                       f"over {workload['days']} days (+{workload['warm_up']} warm-up)", show_lines=True)
    for column in ("figure", "value", "beside it"):
        head.add_column(column, overflow="fold")
    head.add_row("baseline: the same tokens, every task on the premium model immediately", money(baseline),
                 f"ledger baseline of {totals['tasks']:,} served tasks")
    head.add_row("tierbatch: actual cost (shadow and probe calls included)", money(actual),
                 f"saving {saving}% against the baseline")
    head.add_row("floor: cheapest tier meeting the threshold, batch price unless urgent, repeats free",
                 money(floor), f"saving {floor_saving}%; tierbatch {figures['floor_gap_pp']} pp short of it")
    head.add_row("share of the floor's saving that tierbatch achieved", f"{figures['share_of_floor_saving_pct']}%", "")
    head.add_row("agreement with the reference model, answers served (every task)", f"{agreement}%",
                 f"{totals['judged']:,} answers judged by the simulator")
    head.add_row("shadow spend (shadows + probes)", money(Decimal(totals["shadow_usd"]) + Decimal(totals["probe_usd"])),
                 f"{pct(Decimal(totals['shadow_usd']) + Decimal(totals['probe_usd']), baseline)}% of the baseline")
    audit_total = audit["totals"]
    head.add_row("`tierbatch audit` on the baseline calls: its estimate",
                 money(Decimal(audit_total["batched_cost_usd"])),
                 f"saving {audit_total['savings_pct']}% (non-urgent share {audit['non_urgent_share']}); "
                 f"measured: {money(actual)}, {saving}%")
    met = saving >= TARGET_SAVING_PCT and agreement >= TARGET_AGREEMENT_PCT and \
        Decimal(figures["floor_gap_pp"]) <= TARGET_FLOOR_GAP_PP
    head.add_row("target: ≥ 90% saving at ≥ 95% agreement, within 1 pp of the floor's saving", verdict(met),
                 f"saving {verdict(saving >= TARGET_SAVING_PCT)}, "
                 f"agreement {verdict(agreement >= TARGET_AGREEMENT_PCT)}, "
                 f"floor {verdict(Decimal(figures['floor_gap_pp']) <= TARGET_FLOOR_GAP_PP)}")
    console.print(head)

    types = Table(title="by task type")
    for column in ("type", "tasks", "light agrees", "floor tier", "served as", "baseline", "actual", "floor",
                   "saving", "floor saving", "agreement"):
        types.add_column(column, justify="left" if column in ("type", "served as", "floor tier") else "right")
    for name, row in figures["by_type"].items():
        family = FAMILY_BY_NAME[name]
        types.add_row(name, f"{row['tasks']:,}", f"{family.light_agreement:.0%}", row["floor_tier"],
                      ", ".join(f"{k} {v:,}" for k, v in row["served_as"].items()), money(Decimal(row["baseline_usd"])),
                      money(Decimal(row["actual_usd"])), money(Decimal(row["floor_usd"])), f"{row['saving_pct']}%",
                      f"{row['floor_saving_pct']}%", f"{row['agreement_pct']}%")
    console.print(types)

    paths = Table(title="by submission path")
    for column in ("path", "tasks", "baseline", "actual", "floor", "saving", "agreement"):
        paths.add_column(column, justify="left" if column == "path" else "right")
    for name, row in figures["by_path"].items():
        paths.add_row(name, f"{row['tasks']:,}", money(Decimal(row["baseline_usd"])), money(Decimal(row["actual_usd"])),
                      money(Decimal(row["floor_usd"])), f"{row['saving_pct']}%", f"{row['agreement_pct']}%")
    console.print(paths)

    modes = Table(title="ledger by mode and tier")
    for column in ("mode, tier", "requests", "cost", "baseline of those tokens"):
        modes.add_column(column, justify="left" if column == "mode, tier" else "right")
    for name, row in figures["by_mode"].items():
        modes.add_row(name, f"{row['requests']:,}", money(Decimal(row["cost_usd"])),
                      money(Decimal(row["baseline_usd"])))
    console.print(modes)

    gap = Table(title="what separates tierbatch from the floor (actual − floor, per task, by cause; "
                      "negative: cheaper than the floor)")
    for column in ("cause", "tasks", "USD", "pp of the baseline", "their answers' agreement"):
        gap.add_column(column, justify="left" if column == "cause" else "right")
    for name, label in GAP_CAUSES:
        row = figures["gap"][name]
        agreed = f"{row['agreement_pct']}%" if row["agreement_pct"] is not None else "—"
        gap.add_row(label, f"{row['tasks']:,}", money(Decimal(row["usd"])), row["pp_of_baseline"],
                    agreed if name not in ("shadow", "probe") else "—")
    console.print(gap)

    events = Table(title="quality monitor: rule changes (the window at the change is the monitor's own)")
    for column in ("day", "task type", "change", "window"):
        events.add_column(column)
    for event in run["events"]:
        window = event["window"] or {}
        events.add_row(str(event["day"]), event["task_type"], f"{event['action']} {event['from']} → {event['to']}",
                       f"agreement {window.get('agreement')} over {window.get('samples')} comparisons")
    console.print(events)
    monitor = ", ".join(f"{k}: {v['agreed']}/{v['compared']}" for k, v in sorted(figures["monitor"].items()))
    console.print(f"monitor's comparisons (agreed/compared): {monitor}")
    console.print(f"cache: {figures['cache_hits']:,} hits for {figures['workload']['repeats']:,} repeats in the "
                  f"workload; prompt cache: {figures['cached_input_tokens']:,} of {figures['input_tokens']:,} input "
                  "tokens read from the provider's cache")

    timing = Table(title="run (measured under load: wall seconds)")
    for column in ("phase", "tasks", "submit", "settle", "total"):
        timing.add_column(column, justify="left" if column == "phase" else "right")
    for phase in run["phases"]:
        timing.add_row(phase["name"], f"{phase['tasks']:,}", f"{phase['submit_s']:.1f}", f"{phase['settle_s']:.1f}",
                       f"{phase['submit_s'] + phase['settle_s'] + phase['restart_s']:.1f}")
    timing.add_row("whole run (stack start to report)", "", "", "", f"{run['total_s']:.1f}")
    console.print(timing)
    cpu = run["cpu"]
    total_cpu = sum(cpu.values())
    used = ", ".join(f"{name} {seconds:,.0f}" for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]))
    console.print(f"CPU seconds used: {used}; total {total_cpu:,.0f} (the Postgres backends' as they stood when "
                  f"each day ended). On 2 idle cores that is at least {total_cpu / 2:,.0f} s of wall time; this run "
                  f"took {run['total_s']:,.0f} s.")
    console.print(f"figures digest (sha256 of the figures JSON): {run['digest']}")


# --- main ---------------------------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, logs: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    run_started = time.perf_counter()
    days = list(generate_workload(args.seed, args.tasks, args.days))
    warm = warm_up(args.seed)
    items = {item.key: item for item in warm}
    for day in days:
        items.update((item.key, item) for item in day.items)
    if len(items) != sum(len(day.items) for day in days) + len(warm):
        raise RuntimeError("workload item keys are not unique")
    cache_entries = 2 * prompt_cache_entries_bound(list(items.values())) + 10_000
    say(f"workload: {len(items):,} tasks (seed {args.seed}); simulator prompt cache sized {cache_entries:,} entries")

    phases: list[dict[str, Any]] = []
    with scratch_database(args.database_url, prefix="tierbatch_savings") as database_url:
        upgrade_to_head(database_url, SECRET_KEY)
        simulator_port = free_port()
        config_path = logs / "tierbatch.toml"
        files_root = logs / "files"
        config_path.write_text(app_config_text(simulator_port, files_root))
        stack = Stack(tmp=logs, database_url=database_url, redis_url=args.redis_url, config_path=config_path,
                      simulator_port=simulator_port, api_port=free_port())
        processes = Processes(stack, args.workers, args.concurrency, args.pool)
        config = load_config(config_path)
        engine = make_engine(database_url, pool_size=2)
        ctx = Context(config, make_session_factory(engine))
        try:
            stack.start_simulator()
            stack.sim("POST", "/_sim/config", simulator_config(cache_entries))
            stack.start_api()
            tenant_text, key = stack.new_tenant("bench-team")
            tenant = uuid.UUID(tenant_text)
            home = stack.tenant_dir(tenant_text)
            gateway_tasks: dict[str, str] = {}
            day_starts: list[tuple[int, datetime]] = []
            with psycopg.connect(psycopg_dsn(database_url), autocommit=True) as conn, \
                    httpx.Client(base_url=stack.api_url, timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
                schedule_id = create_schedule(client, args.seed)
                # day 0: the shared instruction seen once by each model, one after the other
                processes.start_workers()
                for item in warm:
                    started = time.perf_counter()
                    submitted = Submitted(started_db=db_now(conn))
                    post(client, "/v1/tasks", json={"tasks": [task_body(item, datetime.now(UTC))]})
                    settle = day_settled(ctx, conn, client, tenant, submitted, args.day_timeout, args.stall_seconds)
                    phases.append({"name": f"day 0, warm-up ({item.tier})", "tasks": 1,
                                   "submit_s": time.perf_counter() - started - settle, "settle_s": settle,
                                   "restart_s": 0.0})
                processes.stop_workers(conn)
                for day in days:
                    say(f"day {day.number}: {len(day.items):,} tasks "
                        + ", ".join(f"{path} {n:,}" for path, n in sorted(Counter(i.path for i in day.items).items())))
                    submitted = submit_day(stack, processes, client, key, home, schedule_id, day, conn,
                                           args.gateway_clients)
                    day_starts.append((day.number, submitted.started_db))
                    gateway_tasks.update(submitted.gateway_tasks)
                    restart = time.perf_counter()
                    processes.start_workers()
                    restart_s = time.perf_counter() - restart
                    say(f"  submitted in {submitted.seconds:.1f}s; worker and beat up in {restart_s:.1f}s")
                    settle = day_settled(ctx, conn, client, tenant, submitted, args.day_timeout, args.stall_seconds)
                    stop = time.perf_counter()
                    processes.stop_workers(conn)
                    restart_s += time.perf_counter() - stop
                    say(f"  settled in {settle:.1f}s")
                    phases.append({"name": f"day {day.number}", "tasks": len(day.items), "submit_s": submitted.seconds,
                                   "settle_s": settle, "restart_s": restart_s})
                say("figures: reading the ledger and the simulator's verdicts")
                verdicts_body = stack.sim("GET", "/_sim/verdicts")
                verdicts = {**dict.fromkeys(verdicts_body["reference"], True),
                            **dict.fromkeys(verdicts_body["other"], False)}
                served = collect(ctx, conn, tenant, items, gateway_tasks, verdicts)
                figures = figures_of(served)
                for name, row in figures["by_type"].items():
                    row["floor_tier"] = floor_tier(config, name)
                figures["by_mode"] = ledger_by_mode(conn, tenant)
                figures["monitor"] = monitor_agreement(conn, tenant)
                figures["cache_hits"] = sum(1 for s in served if s.mode == "cache")
                figures["input_tokens"] = sum(s.usage.input_tokens for s in served)
                figures["cached_input_tokens"] = sum(s.usage.cached_tokens for s in served)
                ledger_baseline = Decimal(scalar(conn, "SELECT sum(baseline_cost_usd) FROM ledger_entries "
                                                       "WHERE tenant_id = %s AND mode <> 'shadow'", tenant))
                ledger_cost = Decimal(scalar(conn, "SELECT sum(cost_usd) FROM ledger_entries WHERE tenant_id = %s",
                                             tenant))
                if ledger_baseline != Decimal(figures["totals"]["baseline_usd"]) or \
                        ledger_cost != Decimal(figures["totals"]["actual_usd"]):
                    raise RuntimeError(f"the ledger ({ledger_cost}, baseline {ledger_baseline}) and the per-task "
                                       f"figures ({figures['totals']}) disagree")
                events = routing_events(conn, tenant, day_starts)
                figures["rule_changes"] = [{k: e[k] for k in ("day", "task_type", "action", "from", "to")}
                                           for e in events]
                non_urgent = Decimal(sum(1 for s in served if not s.urgent)) / len(served)
                say("audit: tierbatch audit on the baseline calls")
                audit = audit_baseline(conn, tenant, config_path, logs, non_urgent.quantize(Decimal("0.0001")),
                                       processes.cpu)
                figures["audit"] = {"non_urgent_share": audit["non_urgent_share"], "totals": {
                    k: audit["totals"][k] for k in ("calls", "light_calls", "complex_calls", "actual_cost_usd",
                                                    "routed_cost_usd", "batched_cost_usd", "savings_pct")}}
                for name in ("api", "simulator"):
                    processes.cpu.add_process(name, stack.processes[name])
                processes.cpu.add_backends(conn, make_url(database_url).database or "")
        finally:
            processes.stop_workers()
            stack.stop_all()
            engine.dispose()
            removed = delete_redis_keys(args.redis_url, stack.redis_prefix)
            say(f"stopped every process; deleted {removed} Redis keys under {stack.redis_prefix}")
    figures["workload"] = {
        "seed": args.seed, "tasks": args.tasks, "days": args.days, "warm_up": len(warm),
        "repeats": sum(1 for item in items.values() if item.repeat_of),
        "by_type_and_path": {f.name: dict(sorted(Counter(i.path for i in items.values() if i.family == f.name).items()))
                             for f in FAMILIES},
        "prompt_tokens": sum(item.prompt_tokens() for item in items.values())}
    digest = hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()
    own = resource.getrusage(resource.RUSAGE_SELF)
    processes.cpu.seconds["this script"] += own.ru_utime + own.ru_stime
    run = {"phases": phases, "events": events, "total_s": time.perf_counter() - run_started, "digest": digest,
           "cpu": dict(processes.cpu.seconds)}
    return figures, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="the workload's seed")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks over the days (the warm-up aside)")
    parser.add_argument("--days", type=int, default=5, help="days the tasks are spread over")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (`tierbatch worker` each)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="threads of each worker (or its processes with --pool prefork)")
    parser.add_argument("--pool", choices=("prefork", "threads"), default="threads",
                        help="worker pool (the figures do not depend on it; threads overlap the waits of "
                             "immediate calls)")
    parser.add_argument("--gateway-clients", type=int, default=8, help="concurrent OpenAI-compatible chat clients")
    parser.add_argument("--day-timeout", type=float, default=1800.0, help="seconds a day may take to settle")
    parser.add_argument("--stall-seconds", type=float, default=180.0,
                        help="stop with the live tasks listed when nothing moved for this long")
    parser.add_argument("--figures-json", type=Path, help="write the figures (no timings) here, to diff two runs")
    parser.add_argument("--logs", type=Path, help="keep the process logs and configs here")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="server for the scratch database")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                        help="broker; this run only touches keys under its own prefix")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill still stops every process
    logs = args.logs or Path(tempfile.mkdtemp(prefix="tierbatch-savings-"))
    logs.mkdir(parents=True, exist_ok=True)
    failed = True
    try:
        figures, run = run_bench(args, logs)
        failed = False
    finally:
        if args.logs is None:
            if failed:
                say(f"process logs kept in {logs}")
            else:
                shutil.rmtree(logs, ignore_errors=True)
    if args.figures_json:
        args.figures_json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    say("")
    report(figures, run)


if __name__ == "__main__":
    main()
