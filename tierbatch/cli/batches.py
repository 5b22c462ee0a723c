"""`tierbatch batches list` and `tierbatch batches show ID`: the provider batches over the HTTP API
(`GET /v1/provider-batches`), as a table for people or JSON for scripts. The key is `--api-key`, else
TIERBATCH_API_KEY (the batches holding the tenant's tasks, counting its own lines), else
TIERBATCH_ADMIN_TOKEN (every batch, every line), as `tierbatch costs` chooses it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

if TYPE_CHECKING:  # the command line starts fast: the HTTP client and tables load with the command
    import httpx
    from rich.console import Console

API_PAGE = 1000  # the API's largest page
DEFAULT_LIMIT = 50

batches_app = typer.Typer(help="Provider batches: the batches the batch path sent, with their lines' outcomes.",
                          no_args_is_help=True)

ApiUrlOption = Annotated[str, typer.Option("--api-url", envvar="TIERBATCH_API_URL", help="The tierbatch API.")]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="TIERBATCH_API_KEY",
                                                  help="Tenant API key; else TIERBATCH_ADMIN_TOKEN (every batch).",
                                                  show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@batches_app.command("list")
def list_command(
        status: Annotated[str | None, typer.Option(help="Only preparing, submitted, ingesting, done or failed.")]
        = None,
        provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
        model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
        tenant_id: Annotated[str | None, typer.Option(help="Only the batches of this tenant, as it sees them "
                                                           "(admin token).")] = None,
        limit: Annotated[int, typer.Option(min=1, help="At most this many batches.")] = DEFAULT_LIMIT,
        as_json: JsonOption = False,
        api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Provider batches, newest first: status, lines by outcome, turnaround."""
    from tierbatch.cli.jobs import guarded

    options = ListOptions(status, provider, model, tenant_id, limit, as_json, api_url, api_key)
    guarded(lambda: run_list(options))


@batches_app.command("show")
def show_command(batch_id: Annotated[str, typer.Argument(help="Provider batch id.", show_default=False)],
                 as_json: JsonOption = False,
                 api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """One provider batch: its timestamps, its lines by outcome and its error."""
    from tierbatch.cli.jobs import guarded

    guarded(lambda: run_show(batch_id, as_json, api_url, api_key))


@dataclass(frozen=True, slots=True)
class ListOptions:
    status: str | None
    provider: str | None
    model: str | None
    tenant_id: str | None
    limit: int
    as_json: bool
    api_url: str
    api_key: str | None


def _get(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    from tierbatch.cli.jobs import CliError, error_text, request

    response = request(client, "GET", path, params=params)
    if response.status_code != 200:
        raise CliError(error_text(response))
    body: dict[str, Any] = response.json()
    return body


def fetch_batches(client: httpx.Client, options: ListOptions) -> tuple[list[dict[str, Any]], bool]:
    """Up to `options.limit` batches, newest first, following the pages; and whether more are left."""
    filters = {name: value for name, value in (("status", options.status), ("provider", options.provider),
                                               ("model", options.model), ("tenant_id", options.tenant_id))
               if value is not None}
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params = {**filters, "limit": min(API_PAGE, options.limit - len(rows))}
        if after is not None:
            params["after"] = after
        page = _get(client, "/v1/provider-batches", params)
        rows.extend(page["data"])
        after = page["next"]
        if not page["has_more"] or after is None:
            return rows, False
        if len(rows) >= options.limit:
            return rows, True


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    seconds = float(value)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _when(value: Any) -> str:
    return "-" if value is None else str(value).replace("T", " ")[:19]


def _retried(counts: dict[str, Any]) -> str:
    return "-" if counts.get("retried") is None else str(counts["retried"])


def render_list(rows: list[dict[str, Any]], more: bool, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Provider batches (newest first)")
    for header in ("id", "provider / model", "status", "lines", "succeeded", "failed", "pending", "escalated",
                   "retried", "created", "turnaround"):
        table.add_column(header, overflow="fold")
    for row in rows:
        counts = row["line_counts"]
        status = row["status"] + (f" ({row['provider_status']})" if row["provider_status"] else "")
        table.add_row(row["id"], escape(f"{row['provider']} / {row['model']}"), status, str(row["request_count"]),
                      str(counts["succeeded"]), str(counts["failed"]), str(counts["pending"]),
                      str(counts["escalated"]), _retried(counts), _when(row["created_at"]),
                      _seconds(row["turnaround_seconds"]))
    console.print(table)
    if more:
        console.print("more batches are left: raise --limit or narrow with --status / --provider / --model")


def render_one(row: dict[str, Any], console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    counts = row["line_counts"]
    table = Table(title=f"Provider batch {row['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in (
            ("provider", row["provider"]), ("model", row["model"]),
            ("provider batch id", row["provider_batch_id"] or "-"), ("status", row["status"]),
            ("provider status", row["provider_status"] or "-"), ("lines", str(row["request_count"])),
            ("succeeded", str(counts["succeeded"])), ("failed", str(counts["failed"])),
            ("pending", str(counts["pending"])), ("escalated", str(counts["escalated"])),
            ("retried", _retried(counts)),
            ("created", _when(row["created_at"])), ("submitted", _when(row["submitted_at"])),
            ("completed", _when(row["completed_at"])), ("ingested", _when(row["ingested_at"])),
            ("turnaround", _seconds(row["turnaround_seconds"])), ("error", row["error"] or "-")):
        table.add_row(name, escape(value))
    console.print(table)


def run_list(options: ListOptions) -> None:
    from rich.console import Console

    from tierbatch.cli.costs import resolve_key
    from tierbatch.cli.jobs import CliError, api_client

    if options.limit < 1:
        raise CliError("--limit: must be at least 1")
    with api_client(options.api_url, resolve_key(options.api_key), timeout=60) as client:
        rows, more = fetch_batches(client, options)
    if options.as_json:
        print(json.dumps({"object": "list", "data": rows, "has_more": more}, indent=2))
    else:
        render_list(rows, more, Console())


def run_show(batch_id: str, as_json: bool, api_url: str, api_key: str | None) -> None:
    from rich.console import Console

    from tierbatch.cli.costs import resolve_key
    from tierbatch.cli.jobs import CliError, api_client

    if not batch_id.strip():
        raise CliError("ID: give a provider batch id (see `tierbatch batches list`)")
    with api_client(api_url, resolve_key(api_key), timeout=60) as client:
        row = _get(client, f"/v1/provider-batches/{quote(batch_id, safe='')}")
    if as_json:
        print(json.dumps(row, indent=2))
    else:
        render_one(row, Console())
