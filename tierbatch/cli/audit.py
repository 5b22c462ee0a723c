"""`tierbatch audit LOGFILE`: what logged calls cost, routed and batched. Never calls a
provider and needs no database: the logic is in tierbatch.costs.audit (reading.py reads the files,
estimate.py prices the calls; its docstring says how every figure is made).

- `tierbatch audit calls.jsonl`: a call log, one `{"request": …, "response": …}` per line.
- `tierbatch audit batch_input.jsonl --output batch_output.jsonl`: a Batch API input file and its output file.

The config is `--config FILE`, else TIERBATCH_CONFIG, else the embedded default; provider keys are not needed
(no provider is called). A table for people (skipped lines capped at `SHOWN_SKIPPED`, with their count), or
`--json` for scripts (every skipped line). A progress bar on bytes read is drawn on stderr when it is a
terminal. Exit code 0 when at least one call was read (skipped lines or not), 2 with one red line otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierbatch.base.config import AppConfig, load_config
from tierbatch.base.errors import ConfigError
from tierbatch.cli.jobs import CliError
from tierbatch.costs.audit.estimate import AuditOptions, AuditReport, Figures, Skipped
from tierbatch.costs.audit.reading import AuditError, audit_files

SHOWN_SKIPPED = 20
_DISPLAY_QUANTUM = Decimal("0.000001")


@dataclass(frozen=True)
class AuditCliOptions:
    logfile: Path
    output: Path | None
    config: Path | None
    non_urgent_share: float
    days: float | None
    as_json: bool


class _KeysNotNeeded(Mapping[str, str]):
    """The environment, with a placeholder for any unset variable: the audit calls no provider, so a config
    naming `api_key_env` must load without that key."""

    def __getitem__(self, key: str) -> str:
        return os.environ.get(key) or "not-needed-for-audit"

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


def load_audit_config(explicit: Path | None) -> AppConfig:
    env_path = os.environ.get("TIERBATCH_CONFIG") or None
    path = explicit or (Path(env_path) if env_path else None)
    if path is not None and not path.is_file():
        where = "--config" if explicit else "TIERBATCH_CONFIG"
        raise CliError(f"{where} {path}: no such file")
    try:
        return load_config(path, _KeysNotNeeded())
    except ConfigError as exc:
        raise CliError(f"invalid configuration:\n{exc}") from None


def _check_file(path: Path, what: str) -> int:
    if not path.exists():
        raise CliError(f"{what} {path}: no such file")
    if not path.is_file():
        raise CliError(f"{what} {path}: not a file")
    try:
        return path.stat().st_size
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read the file ({exc.strerror})") from None


def money(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return format(value.quantize(_DISPLAY_QUANTUM).normalize(), ",f")


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value}%"


def _where(skipped: Skipped, mode: str) -> str:
    return f"line {skipped.line}" if mode == "log" else f"{skipped.file} line {skipped.line}"


def _monthly(report: AuditReport, value: Decimal) -> Decimal | None:
    factor = report.monthly_factor
    return None if factor is None else value * factor


def _row_cells(report: AuditReport, name: str, figures: Figures) -> list[str]:
    return [name, f"{figures.calls:,}", f"{figures.light_calls:,}", money(figures.actual_cost),
            money(figures.routed_cost), money(figures.batched_cost), money(figures.batched_savings),
            _pct(figures.savings_pct), money(_monthly(report, figures.batched_savings))]


def _wide_enough(console: Console) -> Console:
    """Piped output is not cut at 80 columns: the table's figures are wanted whole."""
    if console.is_terminal:
        return console
    return Console(width=max(console.width, 120))


def render(report: AuditReport, console: Console) -> None:
    sources = " + ".join(report.files.values())
    share = money(report.non_urgent_share * 100)
    table = Table(title=f"audit of {sources}: {report.calls:,} calls; light tier → {report.light_model.model}, "
                        f"{share}% of light calls batched", title_justify="left", show_footer=True,
                  box=box.SIMPLE_HEAD)
    headers = ("task type", "calls", "light", "actual $", "routed $", "batched $", "saved $", "saved %",
               "saved $/month")
    totals = _row_cells(report, "total", report.totals)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right", footer=totals[index], no_wrap=index == 0,
                         overflow="fold", style="green" if header.startswith("saved $") else None)
    for name in sorted(report.rows):
        table.add_row(*_row_cells(report, name, report.rows[name]))
    console.print(table)

    t = report.totals
    routed_pct = (t.routed_savings * 100 / t.actual_cost).quantize(Decimal("0.01")) if t.actual_cost > 0 else None
    console.print(f"savings: routed ${money(t.routed_savings)} ({_pct(routed_pct)}), routed and batched "
                  f"${money(t.batched_savings)} ({_pct(t.savings_pct)}) of ${money(t.actual_cost)}", highlight=False)
    if report.monthly_factor is None:
        console.print("per month: [yellow]unknown: the log's time span cannot be told (no or a single "
                      "`created`); give --days N[/]", highlight=False)
    else:
        span = "--days" if report.days_source == "--days" else "the log's `created` span"
        days = money(report.days.quantize(Decimal("0.001")) if report.days is not None else None)
        console.print(f"per month (30 days; the calls cover {days} days by {span}): actual "
                      f"${money(_monthly(report, t.actual_cost))}, savings routed "
                      f"${money(_monthly(report, t.routed_savings))}, routed and batched "
                      f"[bold green]${money(_monthly(report, t.batched_savings))}[/]", highlight=False)
    if t.unpriced_calls:
        models = ", ".join(f"{model} ×{count}" for model, count in sorted(report.unpriced_models.items()))
        console.print(f"unpriced: {t.unpriced_calls:,} call(s) left out of the money figures ({models}); add "
                      "them under [prices]", style="yellow", highlight=False, markup=False)
    if report.skipped_count:
        console.print(f"[yellow]skipped lines: {report.skipped_count:,}[/] ({report.lines_read:,} lines read)",
                      highlight=False)
        for item in report.skipped[:SHOWN_SKIPPED]:
            console.print(f"  {_where(item, report.mode)}: {item.reason}", highlight=False, markup=False)
        if report.skipped_count > SHOWN_SKIPPED:
            console.print(f"  … and {report.skipped_count - SHOWN_SKIPPED:,} more (--json lists "
                          f"{'all' if len(report.skipped) == report.skipped_count else 'more'})",
                          highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)


def run_audit(options: AuditCliOptions) -> None:
    size = _check_file(options.logfile, "LOGFILE")
    paths = [options.logfile]
    if options.output is not None:
        size += _check_file(options.output, "--output")
        paths.append(options.output)
    if not math.isfinite(options.non_urgent_share):
        raise CliError("--non-urgent-share: must be a number between 0 and 1")
    if options.days is not None and (not math.isfinite(options.days) or options.days <= 0):
        raise CliError("--days: must be a number more than 0")
    audit_options = AuditOptions(non_urgent_share=Decimal(str(options.non_urgent_share)),
                                 days=Decimal(str(options.days)) if options.days is not None else None)
    config = load_audit_config(options.config)
    console = Console(stderr=True)
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
                        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
    try:
        with progress:
            bar = progress.add_task("reading", total=size or None)
            report = audit_files(paths, config, audit_options,
                                 on_progress=lambda done: progress.update(bar, completed=done))
    except AuditError as exc:
        raise CliError(str(exc)) from None
    if report.calls == 0:
        reasons = "; ".join(f"{_where(s, report.mode)}: {s.reason}" for s in report.skipped[:5])
        more = " …" if report.skipped_count > 5 else ""
        raise CliError(f"{' + '.join(str(p) for p in paths)}: no call could be read ({report.lines_read} "
                       f"non-blank lines)" + (f": {reasons}{more}" if reasons else ""))
    if options.as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        render(report, _wide_enough(Console()))
