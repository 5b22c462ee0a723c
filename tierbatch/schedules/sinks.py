"""Where a run's results go: a JSONL or CSV file at the sink path, inside the tenant's directory."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from tierbatch.base.config import AppConfig
from tierbatch.base.csv_safety import safe_row
from tierbatch.db.models import Schedule, ScheduleRun
from tierbatch.schedules.classifications import iter_classifications
from tierbatch.schedules.source_rows import SourceError
from tierbatch.schedules.spec import FileSinkSpec
from tierbatch.schedules.tenant_files import FILES_DISABLED, PathRefused, path_parts, tenant_files, walk_directories

SINK_COLUMNS = ("item_id", "status", "label", "output", "model", "cost_usd", "error", "task_id")


def sink_path(schedule: Schedule, run: ScheduleRun) -> str:
    """The sink path of this run, relative to the tenant's directory (placeholders filled)."""
    fire = run.fire_time.astimezone(UTC)
    # a name of dots would climb out ("..") once put in a path: leading dots go too
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", schedule.name).lstrip(".") or "_"
    assert schedule.sink is not None
    return str(schedule.sink["path"]).format(run_id=run.id, schedule_id=schedule.id, schedule_name=safe_name,
                                             fire_time=fire.strftime("%Y%m%dT%H%M%SZ"), date=fire.strftime("%Y-%m-%d"))


def _sink_rows(session: Session, run: ScheduleRun, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    for page in iter_classifications(session, run.id):
        for c in page:
            row = {"item_id": c.item_id, "status": c.status, "label": c.label, "output": c.output,
                   "model": c.model, "cost_usd": money_text(c.cost_usd), "error": c.error,
                   "task_id": str(c.task_id) if c.task_id else None}
            yield {k: row[k] for k in columns}


def write_sink(session: Session, schedule: Schedule, run: ScheduleRun, config: AppConfig) -> str:
    """The run's results as JSONL or CSV at the sink path inside the tenant's directory; returns that
    relative path. Every directory is opened without following links (missing ones are made inside);
    the content goes to a new file (O_CREAT|O_EXCL|O_NOFOLLOW) renamed over the name in the same
    directory, so a link planted at the name is replaced, never written through."""
    assert schedule.sink is not None
    files = tenant_files(config, schedule.tenant_id)
    if files is None:
        raise SourceError(FILES_DISABLED)
    path = sink_path(schedule, run)
    parts = path_parts(path)
    kind = FileSinkSpec.model_validate(schedule.sink).resolved_format
    labelled = schedule.job.get("labels") is not None
    columns = [c for c in SINK_COLUMNS if c != ("output" if labelled else "label")]
    top = files.open_directory(create=True)
    try:
        directory = walk_directories(top, parts[:-1], create=True)
    finally:
        os.close(top)
    name = parts[-1]
    temporary = f".tierbatch-{uuid.uuid4().hex}.tmp"
    try:
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
                raise PathRefused(f"{path} is a symbolic link, which is not allowed")
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
                if kind == "csv":
                    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
                    writer.writeheader()
                    for row in _sink_rows(session, run, columns):
                        writer.writerow(safe_row(row))  # no cell a spreadsheet would run as a formula
                else:
                    for row in _sink_rows(session, run, columns):
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fchmod(out.fileno(), 0o644)
            os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=directory)
            raise
    finally:
        os.close(directory)
    return "/".join(parts)


def money_text(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")
