"""The simulator as a real child process: the helpers the simulator's integration tests share,
and tests of the process itself (`python -m simulator`)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support.procs import free_port, managed, python_module, wait_http_ok

pytestmark = pytest.mark.integration


class Sim:
    def __init__(self, port: int, api_key: str = "sk-unused") -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=10)
        self.client = OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0)
        self.baseline: dict[str, Any] = self.http.get("/_sim/config").json()

    def configure(self, patch: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/_sim/config", json=patch)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/_sim/stats").json())

    def restore(self) -> None:
        assert self.http.put("/_sim/config", json=self.baseline).status_code == 200
        assert self.http.post("/_sim/reset").status_code == 200

    def close(self) -> None:
        self.client.close()
        self.http.close()


@contextlib.contextmanager
def start(tmp_path: Path, config: str) -> Iterator[Sim]:
    """A simulator process on a free port with this TOML config; always stopped."""
    config_path = tmp_path / "sim.toml"
    config_path.write_text(config)
    port = free_port()
    args = python_module("tierbatch.simulator", "--host", "127.0.0.1", "--port", str(port), "--config",
                         str(config_path))
    with managed(args, log_path=tmp_path / "simulator.log") as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        sim = Sim(port)
        try:
            yield sim
        finally:
            sim.close()



def test_starts_without_a_config_file(tmp_path: Path) -> None:
    port = free_port()
    args = python_module("tierbatch.simulator", "--host", "127.0.0.1", "--port", str(port))
    with managed(args, log_path=tmp_path / "simulator.log") as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        config = httpx.get(f"http://127.0.0.1:{port}/_sim/config", timeout=5).json()
        assert config["api_key"] == ""
        assert config["batch"]["in_progress_seconds"] == 5.0


def test_bad_config_file_stops_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text('[models."m"]\nagreement = 2\n')
    result = subprocess.run(python_module("tierbatch.simulator", "--port", str(free_port()), "--config", str(config)),
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "models.m.agreement" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr
