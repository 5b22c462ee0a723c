"""The gateway's cost over calling the simulator directly: added latency of `POST /v1/chat/completions`
(target ≤ 1 ms median, sequential), the API process's CPU time per proxied request at 50 concurrent
clients (target ≤ 0.6 ms), the time to a stream's first chunk, and failed requests (target 0).

    .venv/bin/python bench/gateway.py                         # self-contained: scratch database, simulator, API
    .venv/bin/python bench/gateway.py --requests 3000 --concurrency 50
    .venv/bin/python bench/gateway.py --baseline /tmp/main    # also another checkout's API (A/B), interleaved
    .venv/bin/python bench/gateway.py --litellm /tmp/litellm-venv/bin/litellm   # also a LiteLLM proxy

Starts its own processes (a scratch database migrated to head, the simulator with latency 0 via
`/_sim/config`, `tierbatch api` as `tierbatch api` runs it: one uvicorn worker), sends the same chat
request to the simulator directly and through each API (model `gpt-4o-mini`, so all ask the simulator for
the same thing; each of ours is routed, called, and recorded as a task with its ledger row before it
answers), sequentially, as streams, and from 50 concurrent clients, in interleaved rounds so every
path sees the same machine load. Each client has its own keep-alive connection. Prints median and p95
latency per path beside the simulator's own (the raw limit), the added latency (path minus direct),
requests/s, the serving process's CPU time per request (utime + stime from /proc/<pid>/stat around each
round: steadier than latency on a shared machine, and on 2 cores the Python load generator, not the
API, bounds requests/s), the median time to a stream's first `data:` event, failures, and the
baseline's and LiteLLM's ratios to ours. Cleans up everything it started.

`--baseline DIR` runs `tierbatch api` from another checkout's code (say `git archive main | tar -x -C
/tmp/main`) with this environment's interpreter and packages, on the same database and simulator.
`--litellm BINARY` starts a LiteLLM proxy (installed in its own virtual environment, see
bench/README.md) with a config naming the simulator as an OpenAI-compatible base URL, no database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.procs import ManagedProcess, free_port, python_module, wait_http_ok
from tests.support.stack import ADMIN_TOKEN, scratch_database, write_app_config
from tierbatch.base.settings import DEFAULT_DATABASE_URL
from tierbatch.migrations.runner import upgrade_to_head

TARGET_MS = 1.0  # added median latency, sequential
TARGET_CPU_MS = 0.6  # API CPU per proxied request at 50 concurrent clients
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Classify: the parcel arrived broken."}]}


@dataclass
class Endpoint:
    name: str
    url: str  # .../v1/chat/completions
    key: str
    pid: int | None = None  # the serving process, for its CPU time per request


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux /proc); 0 elsewhere."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    latencies_ms: list[float]
    seconds: float
    cpu_seconds: float = 0.0
    failures: int = 0
    first_chunk_ms: list[float] = field(default_factory=list)

    @property
    def first_chunk_median(self) -> float:
        return statistics.median(self.first_chunk_ms) if self.first_chunk_ms else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / len(self.latencies_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client connection (asyncio streams, a pre-built request): the
    client's own cost stays far below either server's, so the difference between paths is the servers'.
    Each client has its own connection (a shared pool would see idle connections closed by the
    server's keep-alive timeout); a broken one is counted as a failure and reopened."""

    def __init__(self, url: str, key: str, *, stream: bool = False) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        body = json.dumps({**REQUEST, "stream": True} if stream else REQUEST).encode()
        self.request = (f"POST {parsed.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.first_byte_ms = 0.0  # of the last call: until the first body byte (a stream's first chunk)

    async def call(self) -> int:
        """One request; its status, 0 when the connection broke (it is reopened on the next call). A
        kept-alive connection the server closed while it was idle (its keep-alive timeout, between
        rounds) is reopened and the request sent again, as any HTTP client does: not a failure."""
        for attempt in range(2):
            reused = self.writer is not None
            try:
                return await self._call()
            except asyncio.IncompleteReadError as exc:
                await self.close()
                if attempt == 0 and reused and not exc.partial:
                    continue
                return 0
            except (ConnectionResetError, BrokenPipeError):
                await self.close()
                if attempt == 0 and reused:
                    continue
                return 0
            except (OSError, ValueError):
                await self.close()
                return 0
        return 0

    async def _call(self) -> int:
        if self.writer is not None and self.reader is not None and self.reader.at_eof():
            await self.close()  # closed by the server while idle
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        started = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if not chunked:
            await self.reader.readexactly(length)
            self.first_byte_ms = (time.perf_counter() - started) * 1000
        else:
            first = True
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if first and data.startswith(b"data:"):
                    self.first_byte_ms = (time.perf_counter() - started) * 1000
                    first = False
                if size == 0:
                    break
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def run_round(connections: list[RawConnection], requests: int) -> Figures:
    """`requests` calls spread over the connections; a failure (not a 200, or a broken connection)
    is counted, never retried."""
    latencies: list[float] = []
    first_chunks: list[float] = []
    failures = 0
    remaining = requests

    async def worker(connection: RawConnection) -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            status = await connection.call()
            latencies.append((time.perf_counter() - started) * 1000)
            first_chunks.append(connection.first_byte_ms)
            if status != 200:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return Figures(latencies, time.perf_counter() - started, failures=failures, first_chunk_ms=first_chunks)


async def measure(endpoints: list[Endpoint], requests: int, concurrency: int, rounds: int, *,
                  stream: bool = False) -> dict[str, Figures]:
    out = {e.name: Figures([], 0.0) for e in endpoints}
    pools = {e.name: [RawConnection(e.url, e.key, stream=stream) for _ in range(concurrency)] for e in endpoints}
    try:
        for endpoint in endpoints:  # warm up connections, caches, price lookups
            await run_round(pools[endpoint.name], max(50, concurrency * 2))
        for _ in range(rounds):
            for endpoint in endpoints:
                cpu_before = cpu_seconds(endpoint.pid)
                figures = await run_round(pools[endpoint.name], requests // rounds)
                out[endpoint.name].cpu_seconds += cpu_seconds(endpoint.pid) - cpu_before
                out[endpoint.name].latencies_ms += figures.latencies_ms
                out[endpoint.name].first_chunk_ms += figures.first_chunk_ms
                out[endpoint.name].seconds += figures.seconds
                out[endpoint.name].failures += figures.failures
    finally:
        for pool in pools.values():
            for connection in pool:
                await connection.close()
    return out


DIRECT = "simulator direct"
OURS = "tierbatch /v1/chat"
BASELINE = "baseline /v1/chat"
LITELLM = "litellm proxy"
LITELLM_KEY = "sk-bench-" + "5f" * 16  # its master key (it refuses to start without one); no database


def report(title: str, figures: dict[str, Figures], *, stream: bool = False) -> None:
    direct = figures[DIRECT]
    print(f"\n{title}")
    print(f"  {'path':<22}{'median ms':>10}{'p95 ms':>9}{'req/s':>8}{'added med':>11}{'added p95':>11}"
          f"{'API CPU/req':>13}{'first chunk':>13}{'failed':>8}")
    for name, f in figures.items():
        added = "" if name == DIRECT else f"{f.median - direct.median:>8.2f} ms"
        added95 = "" if name == DIRECT else f"{f.p95 - direct.p95:>8.2f} ms"
        cpu = f"{f.cpu_ms_per_request:>10.3f} ms" if f.cpu_seconds else ""
        first = f"{f.first_chunk_median:>10.2f} ms" if stream else ""
        print(f"  {name:<22}{f.median:>10.2f}{f.p95:>9.2f}{f.rate:>8,.0f}{added:>11}{added95:>11}{cpu:>13}"
              f"{first:>13}{f.failures:>8}")
    for name in (BASELINE, LITELLM):
        if name in figures and OURS in figures:
            theirs, ours = figures[name], figures[OURS]
            their_added = theirs.median - direct.median
            our_added = ours.median - direct.median
            cpu_ratio = (theirs.cpu_ms_per_request / ours.cpu_ms_per_request) if ours.cpu_seconds else 0.0
            print(f"  {name} / ours: added median {their_added / our_added if our_added > 0 else float('nan'):.2f}×, "
                  f"API CPU per request {cpu_ratio:.2f}×")


def litellm_config(path: Path, sim_port: int) -> Path:
    """A LiteLLM proxy config: the simulator as an OpenAI-compatible base URL, no database."""
    path.write_text("model_list:\n"
                    "  - model_name: gpt-4o-mini\n"
                    "    litellm_params:\n"
                    "      model: openai/gpt-4o-mini\n"
                    f"      api_base: http://127.0.0.1:{sim_port}/v1\n"
                    "      api_key: sim\n"
                    "general_settings:\n"
                    f"  master_key: {LITELLM_KEY}\n"
                    "litellm_settings:\n"
                    "  drop_params: true\n"
                    "  set_verbose: false\n")
    return path


def start_api(stack: ExitStack, env: dict[str, str], log_path: Path, port: int, source: Path | None
              ) -> ManagedProcess:
    """`tierbatch api` of this checkout, or of another one (`source`: its code first on the path, run by
    this environment's interpreter and packages)."""
    args = python_module("tierbatch.cli", "api", "--host", "127.0.0.1", "--port", str(port))
    if source is not None:
        env = {**env, "PYTHONPATH": str(source)}
        args.insert(1, "-P")  # not the working directory first on the path: `source`'s package wins
    api = ManagedProcess(args, env=env, log_path=log_path)
    stack.callback(api.stop)
    wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=api)
    return api


def tenant_key(port: int, name: str) -> str:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/admin/tenants", json={"name": name},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    response.raise_for_status()
    return str(response.json()["api_key"])


@contextmanager
def processes(base_database_url: str, redis_url: str, litellm: str | None, baseline: Path | None = None
              ) -> Iterator[list[Endpoint]]:
    with ExitStack() as stack:
        database_url = stack.enter_context(scratch_database(base_database_url, prefix="tierbatch_bench"))
        upgrade_to_head(database_url)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tierbatch-bench-")))
        sim_port, api_port = free_port(), free_port()
        config = write_app_config(tmp / "tierbatch.toml", sim_port)
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TIERBATCH_CONFIG": str(config),
               "TIERBATCH_ADMIN_TOKEN": ADMIN_TOKEN, "TIERBATCH_REDIS_PREFIX": f"bench-{os.getpid()}:",
               "PYTHONUNBUFFERED": "1"}
        sim = ManagedProcess(python_module("tierbatch.simulator", "--host", "127.0.0.1", "--port", str(sim_port)),
                             env=env,
                             log_path=tmp / "simulator.log")
        stack.callback(sim.stop)
        wait_http_ok(f"http://127.0.0.1:{sim_port}/_sim/stats", proc=sim)
        httpx.post(f"http://127.0.0.1:{sim_port}/_sim/config",
                   json={"models": {"*": {"latency_ms": [0, 0], "error_rate": 0.0}}}).raise_for_status()
        api = start_api(stack, env, tmp / "api.log", api_port, None)
        endpoints = [
            Endpoint(DIRECT, f"http://127.0.0.1:{sim_port}/v1/chat/completions", "sim", sim.pid),
            Endpoint(OURS, f"http://127.0.0.1:{api_port}/v1/chat/completions", tenant_key(api_port, "bench"),
                     api.pid),
        ]
        if baseline is not None:
            port = free_port()
            # its own Redis prefix: its key, cooldown and rate-limit state apart from ours
            other = start_api(stack, {**env, "TIERBATCH_REDIS_PREFIX": f"bench-{os.getpid()}-baseline:"},
                              tmp / "baseline.log", port, baseline)
            endpoints.append(Endpoint(BASELINE, f"http://127.0.0.1:{port}/v1/chat/completions",
                                      tenant_key(port, "baseline"), other.pid))
        if litellm is not None:
            binary = shutil.which(litellm)
            if binary is None:
                print(f"{litellm}: not found (see bench/README.md to install the LiteLLM proxy); skipping it",
                      flush=True)
            else:
                port = free_port()
                proxy = ManagedProcess([binary, "--config", str(litellm_config(tmp / "litellm.yaml", sim_port)),
                                        "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                                       # no database: LiteLLM reads DATABASE_URL and REDIS_URL too
                                       env={"OPENAI_API_KEY": "sim", "LITELLM_LOG": "ERROR",
                                            "PYTHONUNBUFFERED": "1"},
                                       log_path=tmp / "litellm.log")
                stack.callback(proxy.stop)
                wait_http_ok(f"http://127.0.0.1:{port}/health/liveliness", timeout=120, proc=proxy)
                endpoints.append(Endpoint(LITELLM, f"http://127.0.0.1:{port}/v1/chat/completions", LITELLM_KEY,
                                          proxy.pid))
        yield endpoints
        rows = count_rows(database_url)
        print(f"\nrecorded by the APIs: {rows[0]:,} tasks, {rows[1]:,} ledger rows")


def count_rows(database_url: str) -> tuple[int, int]:
    import psycopg

    from tests.support.stack import psycopg_dsn

    with psycopg.connect(psycopg_dsn(database_url)) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM ledger_entries)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def run(coroutine: Callable[[], Coroutine[Any, Any, dict[str, Figures]]]) -> dict[str, Figures]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine())
    return uvloop.run(coroutine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per path and mode")
    parser.add_argument("--streams", type=int, default=300, help="streamed requests per path (sequential)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per mode")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the API of another checkout (e.g. an export of main), interleaved")
    parser.add_argument("--litellm", nargs="?", const="litellm", metavar="BINARY",
                        help="also measure a LiteLLM proxy (its `litellm` executable; default: on PATH)")
    args = parser.parse_args()

    print(f"/v1/chat/completions over the simulator (latency 0): {args.requests} requests per path sequential "
          f"and at {args.concurrency} concurrent clients (each its own connection), {args.streams} streams, "
          f"{args.rounds} interleaved rounds", flush=True)
    with processes(args.database_url, args.redis_url, args.litellm, args.baseline) as endpoints:
        sequential = run(lambda: measure(endpoints, args.requests, 1, args.rounds))
        streams = run(lambda: measure(endpoints, args.streams, 1, args.rounds, stream=True))
        concurrent = run(lambda: measure(endpoints, args.requests, args.concurrency, args.rounds))
    report("sequential (1 client)", sequential)
    report("streams, sequential (first chunk: until the first `data:` event)", streams, stream=True)
    report(f"{args.concurrency} concurrent clients", concurrent)
    added = sequential[OURS].median - sequential[DIRECT].median
    cpu = concurrent[OURS].cpu_ms_per_request
    failures = sum(f.failures for figures in (sequential, streams, concurrent) for f in figures.values())
    print(f"\ntargets: added median (sequential) ≤ {TARGET_MS:g} ms: {added:.2f} ms, "
          f"{'met' if added <= TARGET_MS else 'MISSED'}; API CPU per request at {args.concurrency} clients "
          f"≤ {TARGET_CPU_MS:g} ms: {cpu:.3f} ms, {'met' if cpu <= TARGET_CPU_MS else 'MISSED'}; "
          f"failed requests: {failures}")


if __name__ == "__main__":
    main()
