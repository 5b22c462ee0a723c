"""`tierbatch up` and `tierbatch demo`: the all-in-one stack starts, serves, and stops clean."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from tests.support.procs import REPO_ROOT, ManagedProcess, free_port, python_module, wait_until
from tierbatch.cli.demo.quality_scene import promotion_line
from tierbatch.cli.demo.report import render_report
from tierbatch.cli.embedded.processes import port_accepts

pytestmark = pytest.mark.integration

START_TIMEOUT = 150.0  # the first start runs initdb and the migrations


@pytest.fixture
def embedded_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DATABASE_URL / REDIS_URL / TIERBATCH_CONFIG: the stack runs its embedded services and simulator."""
    for name in ("DATABASE_URL", "REDIS_URL", "TIERBATCH_CONFIG", "TIERBATCH_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


def _two_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _mentions(proc: psutil.Process, markers: list[str]) -> bool:
    """The process's command line or environment names one of the markers (our dir, ports, URLs)."""
    texts: list[str] = []
    with contextlib.suppress(psutil.Error):
        texts.append(" ".join(proc.cmdline()))
    with contextlib.suppress(psutil.Error):
        texts.extend(f"{key}={value}" for key, value in proc.environ().items())
    return any(marker in text for text in texts for marker in markers)


def _leftovers(markers: list[str], family: list[psutil.Process]) -> list[str]:
    me = os.getpid()
    found = [proc for proc in family if not _gone(proc)]
    for proc in psutil.process_iter():
        if proc.pid != me and proc not in found and not _gone(proc) and _mentions(proc, markers):
            found.append(proc)
    described = []
    for proc in found:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
    return described


def _assert_nothing_left(markers: list[str], family: list[psutil.Process], ports: list[int]) -> None:
    try:
        wait_until(lambda: not _leftovers(markers, family), timeout=30, interval=0.2, message="no leftovers")
    except TimeoutError:
        raise AssertionError("processes left behind:\n" + "\n".join(_leftovers(markers, family))) from None
    for port in ports:
        assert not port_accepts(port), f"port {port} still accepts connections"


def _port_of(url: str) -> int:
    return int(httpx.URL(url).port or 0)


def test_up_serves_a_task_and_ctrl_c_stops_everything(tmp_path: Path, embedded_env: None) -> None:
    state = tmp_path / "state"
    api_port, simulator_port = _two_ports()
    api_url = f"http://127.0.0.1:{api_port}"
    stale = state / "metrics" / "counter_999999.db"  # a file of the last run's processes: not summed in again
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over")
    up = ManagedProcess(python_module("tierbatch.cli", "up", "--dir", str(state), "--api-port", str(api_port),
                                      "--simulator-port", str(simulator_port), "--concurrency", "2"),
                        log_path=tmp_path / "up.log")
    try:
        def started() -> bool:
            if not up.alive():
                raise AssertionError(f"tierbatch up exited ({up.popen.returncode}):\n{up.log_text()}")
            return "tierbatch is up" in up.log_text()

        try:
            wait_until(started, START_TIMEOUT, 0.2, "tierbatch up to start")
        except TimeoutError:
            raise AssertionError(f"tierbatch up did not start:\n{up.log_text()}") from None
        assert httpx.get(f"{api_url}/readyz", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{simulator_port}/_sim/stats", timeout=5).status_code == 200

        # tenants' file sources and sinks are confined under the data directory
        config = tomllib.loads((state / "tierbatch.toml").read_text())
        assert config["files"]["root"] == str(state / "files") and (state / "files").is_dir()

        key_file = state / "dev_api_key"
        dev_key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        log = up.log_text()
        assert dev_key in log and f"{api_url}/v1" in log
        assert (state / "admin_token").read_text().strip() in log
        # the key that encrypts webhook secrets: made once, private, given to every process
        secret_key = state / "secret_key"
        assert stat.S_IMODE(secret_key.stat().st_mode) == 0o600 and len(secret_key.read_text().strip()) == 44
        admin_token = (state / "admin_token").read_text().strip()
        made = httpx.post(f"{api_url}/v1/admin/tenants", json={"name": "hooks"}, timeout=10,
                          headers={"Authorization": f"Bearer {admin_token}"})
        assert made.status_code == 201 and made.json()["webhook_secret"].startswith("whsec_"), made.text
        redis_urls = [word for word in log.split() if word.startswith("redis://127.0.0.1:")]
        assert redis_urls, log
        redis_port = _port_of(redis_urls[0])

        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {dev_key}"}, timeout=10) as client:
            created = client.post("/v1/tasks", json={"prompt": "Why is the sky blue? Reason it out.",
                                                     "task_type": "reasoning", "tier": "complex"})
            assert created.status_code == 202, created.text
            task_id = created.json()["id"]

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
                return body if body["status"] in ("succeeded", "failed", "cancelled") else None

            task = wait_until(finished, 60, 0.2, f"task {task_id}")
        assert isinstance(task, dict)
        assert task["status"] == "succeeded", task
        assert task["served_model"] and Decimal(task["cost_usd"]) > 0

        # the prefork worker's children write to <dir>/metrics, the API's /metrics sums them
        assert not stale.exists()

        def finished_in_metrics() -> bool:
            text = httpx.get(f"{api_url}/metrics", timeout=10, headers={"Authorization": f"Bearer {admin_token}"}).text
            return any(sample.name == "tierbatch_tasks_finished_total" and sample.value == 1
                       and sample.labels == {"status": "succeeded", "tier": "complex", "mode": "immediate"}
                       for family in text_string_to_metric_families(text) for sample in family.samples)

        wait_until(finished_in_metrics, 30, 0.2, "the worker's counter in the API's /metrics")

        # everything `up` started and still owns (children, their children, embedded Redis)
        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 5
        os.kill(up.pid, signal.SIGINT)  # the up process only, not its group
        try:
            code = up.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"tierbatch up did not stop on SIGINT:\n{up.log_text()}") from None
        assert code == 0, up.log_text()
    finally:
        up.stop()
    markers = [str(state), f"--port {api_port}", f"--port {simulator_port}", f"127.0.0.1:{redis_port}"]
    _assert_nothing_left(markers, family, [api_port, simulator_port, redis_port])


@contextlib.contextmanager
def _run_in_own_group(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_demo_reports_costs_and_stops(tmp_path: Path, embedded_env: None) -> None:
    state = tmp_path / "demo"
    with _run_in_own_group([sys.executable, "-m", "tierbatch.cli", "demo", "--dir", str(state), "--json"]) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=START_TIMEOUT + 90)
        except subprocess.TimeoutExpired:
            raise AssertionError("tierbatch demo did not finish in time") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stderr[-4000:]}\n{stdout[-2000:]}"
    report = json.loads(stdout)

    rows = report["tasks"]
    assert len(rows) == 16
    immediate = [row for row in rows if row["group"] in ("complex", "light urgent")]
    assert len(immediate) == 10
    for row in immediate:
        assert row["status"] == "succeeded", row
        assert row["served_model"], row
        assert row["cost_usd"] is not None and Decimal(row["cost_usd"]) > 0, row
        assert row["baseline_cost_usd"] is not None, row
    assert all(row["tier"] == "light" for row in rows if row["group"] != "complex"), rows
    complex_rows = [row for row in rows if row["group"] == "complex"]
    assert all(row["tier"] == "complex" and row["cost_usd"] == row["baseline_cost_usd"] for row in complex_rows)
    batch_rows = [row for row in rows if row["group"] == "light batch"]
    # the bulk classification job went through a real (simulated) provider batch, at the batch price
    assert batch_rows and all(row["status"] == "succeeded" and row["mode"] == "batch" for row in batch_rows), \
        batch_rows
    assert all(json.loads(row["output"])["label"] in ("positive", "neutral", "negative") for row in batch_rows)
    assert "batch" in report["totals"]["by_mode"] and "immediate" in report["totals"]["by_mode"]

    priced = [row for row in rows if row["cost_usd"] is not None]
    totals = report["totals"]
    assert totals["priced_tasks"] == len(priced)
    total_cost = sum((Decimal(row["cost_usd"]) for row in priced), Decimal(0))
    total_baseline = sum((Decimal(row["baseline_cost_usd"]) for row in priced), Decimal(0))
    assert Decimal(totals["cost_usd"]) == total_cost
    assert Decimal(totals["baseline_cost_usd"]) == total_baseline
    assert Decimal(totals["savings_usd"]) == total_baseline - total_cost
    assert Decimal(totals["savings_usd"]) > 0  # the light tasks ran on the cheaper model
    assert report["ok"] is True
    # the scheduled classification read the sample uploaded as the tenant's own data file
    schedule_run = report["schedule_run"]
    assert schedule_run is not None and schedule_run["status"] != "failed" and not schedule_run["error"], schedule_run
    assert schedule_run["task_count"] == 40, schedule_run

    # the response cache: the repeats of a deterministic question cost nothing
    cache = report["cache_scene"]
    assert cache is not None and (cache["first"]["status"], cache["first"]["mode"]) == ("succeeded", "immediate")
    assert Decimal(str(cache["first"]["cost_usd"])) > 0
    assert [(r["status"], r["mode"], Decimal(str(r["cost_usd"]))) for r in cache["repeats"]] == \
        [("succeeded", "cache", Decimal(0))] * len(cache["repeats"])
    assert all(Decimal(str(r["baseline_cost_usd"])) > 0 for r in cache["repeats"])

    # the quality scene: a poor cheap model, its task type promoted from batch-path shadows
    scene = report["quality_scene"]
    assert scene is not None, report.get("quality_scene_skipped")
    assert scene["statuses"] == {"succeeded": scene["tasks"]}, scene
    assert scene["shadow_answers"] == scene["shadow_expected"] >= scene["min_samples"], scene
    promotion = scene["promotion"]
    assert promotion is not None, scene
    assert (promotion["task_type"], promotion["action"], promotion["from_tier"], promotion["to_tier"]) == \
        ("sentiment", "promote", "light", "complex")
    assert promotion["figures"]["samples"] >= scene["min_samples"]
    assert promotion["figures"]["agreement"] < promotion["figures"]["promote_below"]
    assert scene["next_task"]["tier"] == "complex", scene
    # the main workload promotes nothing: only the scene's task type has routing changes
    assert [row["task_type"] for row in report["quality"] if row["events"]] == ["sentiment"], report["quality"]
    by_mode = {row["mode"]: row for row in report["costs_by_mode"]["rows"]}
    assert by_mode["shadow"]["requests"] >= scene["shadow_expected"]
    assert Decimal(str(by_mode["shadow"]["cost_usd"])) > 0
    assert by_mode["batch"]["requests"] >= len(batch_rows) + scene["tasks"]

    # what people see: the promotion line (narrated while it runs, and in the report), shadow spend apart
    said = promotion_line(promotion)
    assert said.startswith("promoted sentiment: light → complex (agreement ") and " over " in said, said
    assert f"quality monitor: {said}" in stderr, stderr[-3000:]
    console = Console(record=True, width=200, file=io.StringIO())
    render_report(console, report)
    printed = console.export_text()
    assert said in printed, printed
    assert re.search(r"^│ shadow \(quality monitor\) +│ +\d+ │ +[0-9.]+ │ +- │ +- │$", printed, re.MULTILINE), printed
    assert re.search(r"^shadow spend \(quality monitor\): \$[0-9.]+ over \d+ premium-model calls", printed,
                     re.MULTILINE), printed
    assert f"{len(cache['repeats'])} answered from the cache at $0" in printed, printed

    stack = report["stack"]
    ports = [_port_of(stack["api_url"]), _port_of(stack["simulator_url"]), _port_of(stack["redis_url"])]
    markers = [str(state), *(f"--port {port}" for port in ports[:2]), f"127.0.0.1:{ports[2]}"]
    _assert_nothing_left(markers, [], ports)
