"""`tierbatch submit FILE` and `tierbatch jobs show ID`: bulk jobs over the HTTP API.

The file is read as a stream and sent as NDJSON bodies of `POST /v1/jobs` (the job's fields on the first
line, one item per line after it), each streamed while it is read and stored by the API in one
transaction: up to `--chunk` items per request, under one job name (a request with the name of an
existing job adds its items to it), so memory stays flat whatever the file size.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierbatch.base.states import TERMINAL_TASK_STATUSES

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = TERMINAL_TASK_STATUSES
_RETRIES = 3

err = Console(stderr=True)


class CliError(Exception):
    """A problem to show the user as one line, without a traceback."""


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


# --- reading the input file ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SourceItem:
    line: int  # where the item starts in the file (1-based; for CSV the header is line 1)
    body: dict[str, Any]  # {"id", "text"} or {"id", "messages"}


class CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read, for the upload progress bar."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


def detect_format(path: Path, explicit: str) -> str:
    if explicit != "auto":
        return explicit
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise CliError(f"{path}: cannot tell the format from the extension {suffix!r}; use --format jsonl|csv")


def _item_id(value: Any, where: str, id_field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and not value.strip()):
        raise CliError(f"{where}: field {id_field!r} must be a non-empty string or an integer")
    return value


def read_jsonl(stream: IO[str], id_field: str, text_field: str, name: str) -> Iterator[SourceItem]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise CliError(f"{where}: each line must be a JSON object")
        if id_field not in record:
            raise CliError(f"{where}: no {id_field!r} field (choose another with --id-field)")
        item_id = _item_id(record[id_field], where, id_field)
        if text_field in record:
            text = record[text_field]
            if not isinstance(text, str) or not text.strip():
                raise CliError(f"{where}: field {text_field!r} must be a non-empty string")
            yield SourceItem(number, {"id": item_id, "text": text})
        elif "messages" in record:
            yield SourceItem(number, {"id": item_id, "messages": record["messages"]})
        else:
            raise CliError(f"{where}: no {text_field!r} (or 'messages') field (choose another with --text-field)")


def read_csv(stream: IO[str], id_field: str, text_field: str, name: str, delimiter: str = ",") -> Iterator[SourceItem]:
    reader = csv.DictReader(stream, delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise CliError(f"{name}: bad CSV header ({exc})") from None
    if not header:
        raise CliError(f"{name}: the file is empty (a CSV header with {id_field!r} and {text_field!r} is needed)")
    missing = [f for f in (id_field, text_field) if f not in header]
    if missing:
        raise CliError(f"{name}: the CSV header has no column {missing[0]!r} (columns: {', '.join(header)}); "
                       "choose others with --id-field / --text-field")
    try:
        start = reader.line_num + 1
        for row in reader:
            where = f"{name}:{start}"
            item_id, text = row.get(id_field), row.get(text_field)
            if not item_id or not item_id.strip():
                raise CliError(f"{where}: empty {id_field!r}")
            if text is None or not text.strip():
                raise CliError(f"{where}: empty {text_field!r}")
            yield SourceItem(start, {"id": item_id, "text": text})
            start = reader.line_num + 1
    except csv.Error as exc:
        raise CliError(f"{name}:{reader.line_num}: bad CSV ({exc})") from None


def read_items(stream: IO[str], fmt: str, id_field: str, text_field: str, name: str) -> Iterator[SourceItem]:
    if fmt == "jsonl":
        return read_jsonl(stream, id_field, text_field, name)
    return read_csv(stream, id_field, text_field, name, delimiter="\t" if name.endswith(".tsv") else ",")


# --- talking to the API ----------------------------------------------------------------------------

def api_client(api_url: str, api_key: str | None, timeout: float = 300.0) -> httpx.Client:
    if not api_key:
        raise CliError("no API key: pass --api-key or set TIERBATCH_API_KEY")
    return httpx.Client(base_url=api_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                        timeout=httpx.Timeout(timeout, connect=10.0))


def error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
        message = error.get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{response.status_code} {message or response.text[:300] or response.reason_phrase}"


def request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One call with retries on connection errors and 5xx; raises CliError on what cannot be retried."""
    for attempt in range(1, _RETRIES + 1):
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            if attempt == _RETRIES:
                raise CliError(f"cannot reach the API at {client.base_url}: {exc}") from None
        else:
            if response.status_code < 500 or attempt == _RETRIES:
                return response
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


_ITEM_PARAM = re.compile(r"^items\[(\d+)\]")
_LINE = re.compile(r"^line (\d+):")
MAX_CHUNK = 5_000_000  # items per streamed request; the API's byte limit is what bounds a request
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}
_SEND_BYTES = 256 * 1024  # the body is handed to the connection in pieces of about this size


class ItemSource:
    """The input file read item by item. The next request goes on from where the last one stopped; a
    request that must be sent again is read again from the file (nothing of a streamed request is kept
    in memory)."""

    def __init__(self, path: Path, fmt: str, id_field: str, text_field: str) -> None:
        self.path, self.fmt, self.id_field, self.text_field = path, fmt, id_field, text_field
        self.size = path.stat().st_size
        self.bytes_read = 0  # of the current reading, for the progress bar
        self._reading: Iterator[SourceItem] | None = None
        self._position = 0  # items the current reading has handed out

    def items_from(self, start: int) -> Iterator[SourceItem]:
        if self._reading is None or self._position != start:
            self._reading = self._read()
            self._position = 0
            for _ in itertools.islice(self._reading, start):
                self._position += 1
        return self._take(self._reading)

    def _take(self, reading: Iterator[SourceItem]) -> Iterator[SourceItem]:
        for item in reading:
            self._position += 1
            yield item

    def _read(self) -> Iterator[SourceItem]:
        with self.path.open("rb") as raw:
            counter = CountingReader(raw)
            stream = io.TextIOWrapper(io.BufferedReader(counter), encoding="utf-8-sig", newline="")
            try:
                for item in read_items(stream, self.fmt, self.id_field, self.text_field, self.path.name):
                    self.bytes_read = counter.count
                    yield item
            except UnicodeDecodeError as exc:
                raise CliError(f"{self.path}: not UTF-8 text ({exc.reason})") from None
            self.bytes_read = counter.count

    def line_of(self, index: int) -> int | None:
        """The file line of item `index` (for an error the API named), read again from the file."""
        reading = self._read()
        return next(itertools.islice(reading, index, None), SourceItem(0, {})).line or None


@dataclass
class RequestBody:
    """One request's NDJSON body, produced while the connection takes it: the job's fields, then items."""

    spec: dict[str, Any]
    items: Iterator[SourceItem]
    limit: int
    on_progress: Callable[[RequestBody], None]
    sent: int = 0  # items handed to the connection
    done: bool = False  # every item of the request was handed over; the API is storing the last ones

    def __iter__(self) -> Iterator[bytes]:
        dumps = json.dumps
        pending = [dumps(self.spec, ensure_ascii=False), "\n"]
        size = 0
        for item in self.items:
            line = dumps(item.body, ensure_ascii=False)
            pending += (line, "\n")
            size += len(line)
            self.sent += 1
            if size >= _SEND_BYTES:
                yield "".join(pending).encode()
                pending, size = [], 0
                self.on_progress(self)
            if self.sent >= self.limit:
                break
        if pending:
            yield "".join(pending).encode()
        self.done = True
        self.on_progress(self)


def _refusal(response: httpx.Response, source: ItemSource, start: int, sent: int) -> CliError:
    """The API's refusal, with the file line of the item it names (its `param`, or the line of the body)."""
    try:
        error = response.json()["error"]
        param, message = error.get("param") or "", error.get("message") or ""
    except (ValueError, KeyError, AttributeError, TypeError):
        param, message = "", ""
    index: int | None = None
    if match := _ITEM_PARAM.match(param):
        index = int(match.group(1))
    elif match := _LINE.match(message):
        index = int(match.group(1)) - 2  # line 1 of the body is the job's fields
    where = ""
    if index is not None and 0 <= index < sent:
        line = source.line_of(start + index)
        if line is not None:
            where = f" (at {source.path.name}:{line})"
    return CliError(f"the API refused the job: {error_text(response)}{where}")


def post_stream(client: httpx.Client, spec: dict[str, Any], source: ItemSource, start: int, limit: int,
                on_progress: Callable[[RequestBody], None]) -> tuple[dict[str, Any], int] | None:
    """Send items `start`… (at most `limit`) as one streamed request; returns the answer and the number of
    items it held, or None when the file has no item left. A request that broke or met a 5xx is sent
    again, read again from the file."""
    for attempt in range(1, _RETRIES + 1):
        items = source.items_from(start)
        first = next(items, None)
        if first is None:
            return None
        body = RequestBody(spec, itertools.chain([first], items), limit, on_progress)
        try:
            response = client.post("/v1/jobs", content=iter(body), headers=NDJSON_HEADERS)
        except httpx.TransportError as exc:
            if attempt == _RETRIES:
                raise CliError(f"cannot reach the API at {client.base_url}: {exc}") from None
            time.sleep(0.5 * 2 ** attempt)
            continue
        if response.status_code == 202:
            answer: dict[str, Any] = response.json()
            return answer, body.sent
        if response.status_code == 409 and attempt > 1 and "already has an item" in response.text:
            # a retry of a request whose first try was stored after all (its answer was lost)
            return {"items_added": body.sent, "retried": True}, body.sent
        if response.status_code >= 500 and attempt < _RETRIES:
            time.sleep(0.5 * 2 ** attempt)
            continue
        raise _refusal(response, source, start, body.sent)
    raise AssertionError("unreachable")


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = request(client, "GET", f"/v1/jobs/{job_id}")
    if response.status_code != 200:
        raise CliError(f"cannot read job {job_id}: {error_text(response)}")
    body: dict[str, Any] = response.json()
    return body


# --- output ----------------------------------------------------------------------------------------

def done_count(job: dict[str, Any]) -> int:
    return sum(int(job.get("counts", {}).get(status, 0)) for status in TERMINAL)


def job_table(job: dict[str, Any]) -> Table:
    table = Table(title=f"job {job.get('name') or ''} ({job['id']})", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    table.add_row("status", str(job.get("status")))
    table.add_row("task type", str(job.get("task_type")))
    table.add_row("tasks", str(job.get("task_count")))
    for status, count in (job.get("counts") or {}).items():
        table.add_row(f"  {status}", str(count))
    table.add_row("cost (USD)", str(job.get("cost_usd")))
    table.add_row("baseline (USD)", str(job.get("baseline_cost_usd")))
    table.add_row("savings (USD)", f"[green]{job.get('savings_usd')}[/]")
    if job.get("unpriced_requests"):
        table.add_row("unpriced requests", f"[yellow]{job['unpriced_requests']}[/]")
    table.add_row("created", str(job.get("created_at")))
    table.add_row("finished", str(job.get("finished_at") or "-"))
    return table


def print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(job) + "\n")
    else:
        Console().print(job_table(job))


# --- the commands ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitOptions:
    file: Path
    name: str | None
    task_type: str | None
    tier: str | None
    urgent: bool
    labels: str | None
    system: str | None
    template: str | None
    id_field: str
    text_field: str
    file_format: str
    chunk: int
    wait: bool
    poll_seconds: float
    as_json: bool
    api_url: str
    api_key: str | None


def job_spec(options: SubmitOptions, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name}
    if options.task_type:
        spec["task_type"] = options.task_type
    if options.tier:
        spec["tier"] = options.tier
    if options.urgent:
        spec["urgent"] = True
    if options.labels is not None:
        labels = [label.strip() for label in options.labels.split(",")]
        if not all(labels):
            raise CliError(f"--labels: {options.labels!r} has an empty label; give a,b,c")
        spec["labels"] = labels
    if options.system:
        spec["system"] = options.system
    if options.template:
        spec["template"] = options.template
    return spec


def _progress(console: Console, *columns: Any) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), *columns,
                    TimeElapsedColumn(), console=console, transient=False, disable=not console.is_terminal)


def run_submit(options: SubmitOptions) -> None:
    if not options.file.is_file():
        raise CliError(f"{options.file}: no such file")
    if options.chunk < 1 or options.chunk > MAX_CHUNK:
        raise CliError(f"--chunk: between 1 and {MAX_CHUNK} items per request")
    fmt = detect_format(options.file, options.file_format)
    name = options.name or f"{options.file.stem}-{uuid.uuid4().hex[:8]}"
    spec = job_spec(options, name)
    console = Console(stderr=True)
    source = ItemSource(options.file, fmt, options.id_field, options.text_field)
    job_id: str | None = None
    stored = 0
    with api_client(options.api_url, options.api_key) as client:
        # "sent": bytes of the file handed to the connection (the API reads a body only as fast as it stores
        # it); "stored": items of the requests the API has committed, the only ones that count
        with _progress(console, DownloadColumn(), TextColumn("{task.fields[items]:,} items stored")) as progress:
            upload = progress.add_task("sending", total=source.size, items=0)

            # the bar is full only once the API has answered for the last items, not when they are sent
            def show(body: RequestBody) -> None:
                progress.update(upload, completed=min(source.bytes_read, source.size - 1),
                                description="storing" if body.done else "sending")

            while True:
                result = post_stream(client, spec, source, stored, options.chunk, show)
                if result is None:
                    break
                answer, sent = result
                job_id = answer.get("id", job_id)
                stored += sent
                progress.update(upload, completed=min(source.bytes_read, source.size - 1), items=stored,
                                description="sending")
            progress.update(upload, completed=source.size, items=stored, description="stored")
        if job_id is None:
            raise CliError(f"{options.file}: no items in the file")
        if not options.as_json:
            console.print(f"submitted {stored} items as job [bold]{name}[/] ({job_id})")
        job = get_job(client, job_id)
        if options.wait:
            job = wait_for_job(client, job, console, options.poll_seconds)
    print_job(job, options.as_json)


def wait_for_job(client: httpx.Client, job: dict[str, Any], console: Console, poll_seconds: float
                 ) -> dict[str, Any]:
    with _progress(console, MofNCompleteColumn()) as progress:
        bar = progress.add_task("tasks done", total=job["task_count"], completed=done_count(job))
        while job["status"] != "completed":
            time.sleep(poll_seconds)
            job = get_job(client, job["id"])
            progress.update(bar, total=job["task_count"], completed=done_count(job))
    return job


def run_show(job_id: str, as_json: bool, api_url: str, api_key: str | None) -> None:
    with api_client(api_url, api_key) as client:
        print_job(get_job(client, job_id), as_json)


def guarded(action: Callable[[], None]) -> None:
    """Run a command body: CliError becomes one red line and exit code 2, Ctrl-C exit code 130."""
    try:
        action()
    except CliError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
