"""tierbatch: a self-hosted job processor that routes, batches and prices every LLM call.

The package's layers, top to bottom (a test enforces them; docs/architecture.md explains each):
entry points (`cli`; `api`, `worker`, `simulator`), the OpenAI batch facade, the request paths
(`gateway`, `schedules`), the work they create (`jobs`, `batching`, `quality`), `tasks`, the services
tasks use (`costs`, `cache`, `providers`, `tenants`), the rules those read (`routing`, `ledger`,
`webhooks`), the schema (`db`) and the foundation (`base`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tierbatch")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
