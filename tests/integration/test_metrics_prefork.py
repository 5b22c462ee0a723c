"""`tierbatch worker --pool prefork --metrics-port`: the worker's own HTTP endpoint serves the series its
prefork children recorded (summed through a multiprocess directory it makes for itself when none is set),
and that directory goes when the worker stops. A module stack of its own: the worker is replaced."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import ManagedProcess, free_port, python_module, wait_until
from tests.support.stack import Stack, own_stack, write_app_config

pytestmark = pytest.mark.integration

URGENT_TASKS = 6


@pytest.fixture(scope="module")
def prefork_stack(base_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = Path(tmp_path_factory.mktemp("metrics-prefork"))
    with own_stack(base_database_url, tmp, "tierbatch_metrics_prefork", write_app_config, beat=False) as running:
        yield running


def _value(text: str, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and wanted <= set(sample.labels.items()))


def test_a_prefork_worker_serves_its_childrens_series_on_its_metrics_port(prefork_stack: Stack) -> None:
    stack = prefork_stack
    stack.processes["worker"].stop()
    port = free_port()
    # no PROMETHEUS_MULTIPROC_DIR: the worker makes its own (the stack's env sets one for the API)
    args = ["env", "-u", "PROMETHEUS_MULTIPROC_DIR",
            *python_module("tierbatch.cli", "worker", "--concurrency", "2", "--pool", "prefork",
                           "--metrics-port", str(port))]
    worker: ManagedProcess = stack._start("worker", args)
    try:
        wait_until(lambda: worker.logged("ready.") or not worker.alive(), 60, 0.1, "prefork worker ready")
        assert worker.alive(), worker.log_text()
        found = re.search(r"summed over the processes writing to (\S+)", worker.log_text())
        assert found, worker.log_text()
        directory = Path(found.group(1))
        assert directory.is_dir() and directory != stack.metrics_dir

        key = stack.new_tenant_key("prefork-metrics")
        with stack.client(key) as client:
            accepted = client.post("/v1/tasks", json={"tasks": [
                {"prompt": f"Say hi {n}", "tier": "light", "urgent": True} for n in range(URGENT_TASKS)]})
            assert accepted.status_code == 202, accepted.text
            for task in accepted.json()["data"]:
                stack.wait_for_task(client, task["id"], {"succeeded"}, timeout=60)

        def counted() -> str | None:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            done = _value(text, "tierbatch_tasks_finished_total", status="succeeded", mode="immediate")
            return text if done >= URGENT_TASKS else None

        text = wait_until(counted, 30, 0.2, "the children's counters on the worker's port")
        assert isinstance(text, str)
        assert _value(text, "tierbatch_tasks_finished_total", status="succeeded", mode="immediate") == URGENT_TASKS
        assert _value(text, "tierbatch_provider_call_seconds_count", surface="worker") == URGENT_TASKS
        # written by the children (pids other than the parent's), read by the parent's server
        writers = {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("counter_*.db")}
        assert writers and worker.pid not in writers
    finally:
        worker.stop()
    wait_until(lambda: not directory.exists(), 10, 0.1, "the worker's metrics directory removed at exit")
