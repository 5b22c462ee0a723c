"""The scrape: this process's series, or every process's under `PROMETHEUS_MULTIPROC_DIR`.

In multiprocess mode each process (API workers, Celery's prefork children, beat) writes its values
to files in that directory and the scrape sums them (`MultiProcessCollector`), so the API's
`/metrics` shows the worker's counters when both share the directory (`tierbatch up`, the test stack).
Where they cannot (other hosts, other containers), `tierbatch worker --metrics-port` serves the worker's
own (`serve`). Without the variable a process serves its own registry, process metrics included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import tierbatch.metrics.catalog  # noqa: F401  every series defined before the first scrape
from tierbatch.metrics.process import multiprocess_directory


class _ProcessRegistry(Collector):
    """The default registry as one collector of a scrape's registry (without re-registering its names)."""

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape_registry(*extra: Collector) -> CollectorRegistry:
    """A registry for one scrape (or one metrics server): every process's series in multiprocess mode,
    else this process's; then `extra` (the API's scrape-time gauges)."""
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_directory()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)
    else:
        registry.register(_ProcessRegistry())
    for collector in extra:
        registry.register(collector)
    return registry


class _WithoutTenants(Collector):
    """A scrape with every `tenant` label summed away: what the installation did, not who did it (the
    view of a scraper without the admin token)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if not any("tenant" in sample.labels for sample in family.samples):
                yield family
                continue
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "tenant")))
                sums[key] = sums.get(key, 0.0) + sample.value
            summed = Metric(family.name, family.documentation, family.type, family.unit)
            summed.samples = [Sample(name, dict(labels), value) for (name, labels), value in sums.items()]
            yield summed


def render(*extra: Collector, per_tenant: bool = True) -> bytes:
    """The scrape's text; `per_tenant=False` sums the tenant label away."""
    registry = scrape_registry(*extra)
    if per_tenant:
        return generate_latest(registry)
    outer = CollectorRegistry(auto_describe=False)
    outer.register(_WithoutTenants(registry))
    return generate_latest(outer)


def serve(port: int, host: str = "127.0.0.1") -> Any:
    """Serve the scrape over HTTP from a thread of this process (`tierbatch worker|beat --metrics-port`)."""
    server, _thread = start_http_server(port, addr=host, registry=scrape_registry())
    return server
