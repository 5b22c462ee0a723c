"""`tierbatch costs`: cost queries and the token report over the HTTP API.

The key is `--api-key`, else TIERBATCH_API_KEY (a tenant sees its own rows), else TIERBATCH_ADMIN_TOKEN
(every tenant). `--since` / `--until` take a duration back from now (`30m`, `24h`, `7d`, `2w`), a date
(UTC; an `--until` date includes that whole day) or an RFC 3339 timestamp; durations are turned into
timestamps here, so the table says exactly which range it covers.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from tierbatch.base.csv_safety import safe_cell
from tierbatch.base.errors import InvalidInput
from tierbatch.cli.jobs import CliError, api_client, error_text, request
from tierbatch.costs.query import COUNTS, MONEY, parse_group_by, parse_instant

_HEADERS = {"requests": "requests", "input_tokens": "input tok", "cached_tokens": "cached tok",
            "output_tokens": "output tok", "reasoning_tokens": "reasoning tok", "cost_usd": "cost $",
            "baseline_cost_usd": "baseline $", "savings_usd": "savings $", "savings_pct": "savings %",
            "unpriced_requests": "unpriced"}
_DIM_KEYS = {"job": "job_id", "tenant": "tenant_id"}


@dataclass(frozen=True)
class CostsOptions:
    by: str
    since: str | None
    until: str | None
    task_type: str | None
    job_id: str | None
    mode: str | None
    tenant_id: str | None
    as_json: bool
    as_csv: bool
    report: bool
    limit: int
    api_url: str
    api_key: str | None


def resolve_key(explicit: str | None) -> str | None:
    return explicit or os.environ.get("TIERBATCH_API_KEY") or os.environ.get("TIERBATCH_ADMIN_TOKEN") or None


def query_params(options: CostsOptions, now: datetime | None = None) -> dict[str, str]:
    """Check what can be checked here (the API checks again) and make durations absolute."""
    now = now or datetime.now(UTC)
    params: dict[str, str] = {}
    try:
        if not options.report:
            dims = parse_group_by([options.by], admin=True)
            if dims:
                params["group_by"] = ",".join(dims)
            params["limit"] = str(options.limit)
        if options.since:
            params["since"] = parse_instant(options.since, "since", now).isoformat()
        if options.until:
            params["until"] = parse_instant(options.until, "until", now, end=True).isoformat()
    except InvalidInput as exc:
        raise CliError(f"--{(exc.param or 'by').replace('group_by', 'by').replace('_', '-')}: "
                       f"{exc.message.split(': ', 1)[-1]}") from None
    for name, value in (("task_type", options.task_type), ("job_id", options.job_id), ("mode", options.mode),
                        ("tenant_id", options.tenant_id)):
        if value:
            params[name] = value
    return params


def fetch(options: CostsOptions) -> dict[str, Any]:
    params = query_params(options)
    path = "/v1/costs/report" if options.report else "/v1/costs"
    with api_client(options.api_url, resolve_key(options.api_key), timeout=120.0) as client:
        response = request(client, "GET", path, params=params)
    if response.status_code != 200:
        raise CliError(f"the API refused the query: {error_text(response)}")
    body: dict[str, Any] = response.json()
    return body


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _money_cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{float(value):,.4f}" if abs(float(value)) >= 0.0001 or float(value) == 0 else str(value)


def cost_table(body: dict[str, Any]) -> Table:
    dims = [_DIM_KEYS.get(d, d) for d in body.get("group_by", [])]
    if "tenant_id" in dims:
        dims.insert(dims.index("tenant_id") + 1, "tenant_name")
    span = f"{body.get('since') or 'start'} → {body.get('until') or 'now'}"
    by = ", ".join(body.get("group_by", [])) or "nothing"
    table = Table(title=f"costs by {by} ({span})", title_justify="left", show_footer=True)
    totals = body["totals"]
    metrics = ["requests", "input_tokens", "cached_tokens", "output_tokens", "cost_usd", "baseline_cost_usd",
               "savings_usd", "savings_pct", "unpriced_requests"]
    for index, name in enumerate(dims):
        table.add_column(name, footer="total" if index == 0 else "")
    for name in metrics:
        value = totals.get(name)
        footer = _money_cell(value) if name in MONEY else _cell(value)
        table.add_column(_HEADERS[name], justify="right", footer=footer,
                         style="green" if name == "savings_usd" else None)
    for row in body["rows"]:
        cells = [_cell(row.get(d)) for d in dims]
        cells += [_money_cell(row.get(m)) if m in MONEY else _cell(row.get(m)) for m in metrics]
        table.add_row(*cells)
    return table


def report_table(body: dict[str, Any]) -> Table:
    period = body["period"]
    table = Table(title=f"tokens and cost per task type ({period['since']} → {period['until']}; compared with "
                        f"the {body['growth_threshold_pct']}% growth threshold)", title_justify="left")
    for header in ("task type", "requests", "input $", "output $", "output share", "cached share",
                   "out tok/req", "before", "growth", "verbose"):
        table.add_column(header, justify="left" if header == "task type" else "right")
    for row in body["task_types"]:
        growth = row.get("output_tokens_growth_pct")
        table.add_row(
            row["task_type"], _cell(row["requests"]), _money_cell(row["input_side_cost_usd"]),
            _money_cell(row["output_cost_usd"]), _pct(row.get("output_cost_share_pct")),
            _pct(row.get("cached_token_share_pct")), _cell(row.get("output_tokens_per_request")),
            _cell(row.get("previous_output_tokens_per_request")), _pct(growth),
            "[bold yellow]yes[/]" if row.get("verbose") else "",
        )
    return table


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value}%"


def write_csv(body: dict[str, Any], report: bool) -> None:
    rows: list[dict[str, Any]] = body["task_types"] if report else body["rows"]
    if report:
        fields = ["task_type", *COUNTS, *MONEY, "savings_pct", "input_side_cost_usd", "input_cost_share_pct",
                  "output_cost_share_pct", "cached_token_share_pct", "output_tokens_per_request",
                  "previous_output_tokens_per_request", "previous_requests", "output_tokens_growth_pct", "verbose"]
    else:
        dims = [_DIM_KEYS.get(d, d) for d in body.get("group_by", [])]
        if "tenant_id" in dims:
            dims.append("tenant_name")
        fields = [*dims, *COUNTS, *MONEY, "savings_pct"]
    # the names (task types, tenant names, ...) come from tenants and must not run as formulas; the figures
    # are ours and stay numbers (a negative saving keeps its sign)
    names = {"task_type"} if report else set(fields) - {*COUNTS, *MONEY, "savings_pct"}
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: safe_cell(value) if isinstance(value, str) and key in names else value
                         for key, value in row.items()})


def run_costs(options: CostsOptions) -> None:
    if options.as_json and options.as_csv:
        raise CliError("--json and --csv: choose one")
    body = fetch(options)
    if options.as_json:
        sys.stdout.write(json.dumps(body) + "\n")
    elif options.as_csv:
        write_csv(body, options.report)
    else:
        console = Console()
        console.print(report_table(body) if options.report else cost_table(body))
        if not options.report and body.get("truncated"):
            console.print(f"[yellow]only the first {len(body['rows'])} rows are shown (--limit); "
                          "the totals cover every row[/]")
