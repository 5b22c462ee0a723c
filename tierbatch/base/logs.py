"""Logging of every process: one format (`json` lines or `text`), the correlation ids, and redaction.

- `request_id` (API), `task_id` and `batch_id` (worker) live in context variables: set where a request or a task
  starts, they are on every record logged inside it, wherever it is logged from.
- `JsonFormatter` writes one JSON object per line: `ts`, `level`, `logger`, `message`, the ids when set,
  the fields given as `extra=` that are plain values, and `exc_info` as text.
- `RedactingFilter` masks what looks like a credential (tenant keys `tb_…`, provider keys `sk-…`, webhook
  secrets `whsec_…`, bearer tokens) in the message and the extra fields: code must never log one, this is
  the second line of defence.
- `configure_logging(format, level)` (worker, beat: Celery's `setup_logging` signal) and
  `uvicorn_log_config(format)` (API, simulator) install one stderr handler on the root logger; the format
  comes from `--log-format` or `TIERBATCH_LOG_FORMAT`, which `tierbatch up` hands down to its children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")
LOG_FORMAT_ENV = "TIERBATCH_LOG_FORMAT"

request_id_var: ContextVar[str | None] = ContextVar("tierbatch_request_id", default=None)
task_id_var: ContextVar[str | None] = ContextVar("tierbatch_task_id", default=None)
batch_id_var: ContextVar[str | None] = ContextVar("tierbatch_batch_id", default=None)
_IDS = (("request_id", request_id_var), ("task_id", task_id_var), ("batch_id", batch_id_var))


@contextlib.contextmanager
def bound(var: ContextVar[str | None], value: object) -> Iterator[None]:
    """`var` holds `value` (as text) inside the block, and what it held before after it."""
    token = var.set(None if value is None else str(value))
    try:
        yield
    finally:
        var.reset(token)


# --- text from outside -----------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
MAX_SHOWN_CHARS = 200


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """A client's text (a path, a method) fit to log or repeat: control characters as `?`, at most
    `limit` characters (then `…`)."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub("?", text)


# --- redaction --------------------------------------------------------------------------------------
_SECRET = re.compile(
    r"(?P<kept>tb_|sk-(?:proj-|ant-|admin-)?|whsec_)[A-Za-z0-9_\-+/=]{8,}"  # keys by their prefix
    r"|(?P<scheme>(?i:bearer)\s+)[^\s,;\"']{8,}")  # whatever a bearer token is
_HINT = re.compile(r"tb_|sk-|whsec_|earer|EARER")  # every match holds one: most lines stop at this scan
MASK = "[REDACTED]"


def redact(text: str) -> str:
    """`text` with every credential-looking run replaced by its prefix and MASK."""
    if _HINT.search(text) is None:
        return text
    return _SECRET.sub(lambda m: (m.group("kept") or m.group("scheme") or "") + MASK, text)


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's final message and its string extra fields (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        fields = record.__dict__
        for key in fields.keys() - _STANDARD_ATTRS:
            value = fields[key]
            if isinstance(value, str):
                fields[key] = redact(value)
        return True


# --- formatting -------------------------------------------------------------------------------------
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                        "color_message"}
_PLAIN = (str, int, float, bool, type(None))
_NOT_EXTRA = _STANDARD_ATTRS | {"ts", "level", "logger"}


def correlation_ids() -> dict[str, str]:
    return {name: value for name, var in _IDS if (value := var.get()) is not None}


# one encoder for every line: `json.dumps` with options builds a new one per call
_encode_line = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            **correlation_ids()}
        fields = record.__dict__
        for key, value in fields.items():  # in the order given; an id given as `extra` wins over the context's
            if key not in _NOT_EXTRA and isinstance(value, _PLAIN):
                line[key] = value
        if record.exc_info:
            line["exc_info"] = redact(self.formatException(record.exc_info))
        return _encode_line(line)


class TextFormatter(logging.Formatter):
    """`time level logger [ids] message`, for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = correlation_ids()
        fields = record.__dict__
        for name, _ in _IDS:  # as in JSON: an id given as `extra` wins over the context's
            given = fields.get(name)
            if isinstance(given, str):
                ids[name] = given
        record.__dict__["ids"] = (" [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]") if ids else ""
        try:
            return redact(super().format(record))
        finally:
            record.__dict__.pop("ids", None)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def log_format_from_env(default: LogFormat = "text") -> LogFormat:
    value = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if value in LOG_FORMATS:
        return value  # type: ignore[return-value]
    return default


def handler_for(log_format: LogFormat) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(log_format: LogFormat | None = None, level: int | str = logging.INFO) -> None:
    """Root logger of a worker or beat process: one stderr handler in `log_format` (default:
    TIERBATCH_LOG_FORMAT, else text), replacing any it had."""
    chosen = log_format or log_format_from_env()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler_for(chosen))
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per outgoing call, URL included


def uvicorn_log_config(log_format: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """A `log_config` for uvicorn.run: the same handler for its loggers and the root, so a server
    process (also each of several uvicorn workers) logs in one format."""
    formatter = "tierbatch.base.logs.JsonFormatter" if log_format == "json" else "tierbatch.base.logs.TextFormatter"
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"redact": {"()": "tierbatch.base.logs.RedactingFilter"}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "default", "filters": ["redact"]}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {"uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
                    "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
                    "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": True},
                    "httpx": {"level": "WARNING"}},
    }
