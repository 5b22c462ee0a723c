"""Log lines: one JSON object per record with the correlation ids, and no credential in any of them,
whether it came in the message, its arguments, an `extra` field or an exception's text."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from tierbatch.api.errors import install_error_handlers
from tierbatch.api.request_ids import AccessLines, install_request_ids
from tierbatch.base.logs import (
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    bound,
    redact,
    request_id_var,
    shown,
    task_id_var,
)
from tierbatch.tenants.store import new_api_key
from tierbatch.webhooks.signing import new_secret

TENANT_KEY = new_api_key()
WEBHOOK_SECRET = new_secret()
PROVIDER_KEY = "sk-proj-" + secrets.token_urlsafe(40)
ANTHROPIC_KEY = "sk-ant-api03-" + secrets.token_urlsafe(40)
ADMIN_TOKEN = secrets.token_urlsafe(32)
SECRETS = (TENANT_KEY, WEBHOOK_SECRET, PROVIDER_KEY, ANTHROPIC_KEY, ADMIN_TOKEN)


def record(msg: str, *args: object, extra: dict[str, object] | None = None,
           exc: BaseException | None = None) -> logging.LogRecord:
    made = logging.LogRecord("tierbatch.test", logging.WARNING, __file__, 1, msg, args or None,
                             (type(exc), exc, exc.__traceback__) if exc is not None else None)
    made.__dict__.update(extra or {})
    return made


def emitted(made: logging.LogRecord, formatter: logging.Formatter) -> str:
    RedactingFilter().filter(made)
    return formatter.format(made)


def test_a_json_line_has_the_fields_and_the_ids_of_its_context() -> None:
    with bound(request_id_var, "req-1"), bound(task_id_var, uuid.UUID(int=7)):
        line = json.loads(JsonFormatter().format(record("served %s in %dms", "gpt-4o", 12,
                                                        extra={"status": 200, "nested": {"no": 1}})))
    assert line["level"] == "WARNING" and line["logger"] == "tierbatch.test"
    assert line["message"] == "served gpt-4o in 12ms"
    assert line["request_id"] == "req-1" and line["task_id"] == str(uuid.UUID(int=7))
    assert line["status"] == 200
    assert "nested" not in line  # only plain values: a dict may hold anything
    assert line["ts"].endswith("+00:00")
    assert request_id_var.get() is None and task_id_var.get() is None  # reset after the block


def test_outside_any_request_a_line_has_no_ids() -> None:
    line = json.loads(JsonFormatter().format(record("tick")))
    assert "request_id" not in line and "task_id" not in line


def test_text_lines_show_the_ids() -> None:
    with bound(request_id_var, "req-2"):
        text = TextFormatter().format(record("hello"))
    assert "[request_id=req-2]" in text and text.endswith("hello")


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_credentials_are_masked_wherever_they_are(formatter: logging.Formatter) -> None:
    try:
        raise RuntimeError(f"upstream said: Authorization: Bearer {ADMIN_TOKEN}, key {PROVIDER_KEY}")
    except RuntimeError as exc:
        failure = exc
    lines = [
        emitted(record("auth failed for %s", TENANT_KEY), formatter),
        emitted(record(f"webhook signed with {WEBHOOK_SECRET}"), formatter),
        emitted(record("call", extra={"api_key": ANTHROPIC_KEY, "header": f"Bearer {ADMIN_TOKEN}"}), formatter),
        emitted(record("provider call failed", exc=failure), formatter),
    ]
    for line in lines:
        for secret in SECRETS:
            assert secret not in line
        # text lines leave the extra fields out; JSON keeps them, masked
        assert "[REDACTED]" in line or (isinstance(formatter, TextFormatter) and line.endswith(" call"))


def test_redaction_keeps_the_prefix_and_ordinary_text() -> None:
    assert redact(f"key={TENANT_KEY}.") == "key=tb_[REDACTED]."
    assert redact("GET /v1/tasks/0b5c-41 200 task_type=classification") == (
        "GET /v1/tasks/0b5c-41 200 task_type=classification")


def test_shown_text_is_bounded_and_printable() -> None:
    assert shown("/v1/\x1b[31mred\r\n" + "a" * 500, 20) == "/v1/?[31mred??aaaaaa…"


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())
        self.addFilter(RedactingFilter())

    def emit(self, made: logging.LogRecord) -> None:
        self.lines.append(self.format(made))


@pytest.fixture
def captured() -> Iterator[tuple[Captured, logging.Logger]]:
    """The lines of the API's error logger and of an access logger of the test's own."""
    handler = Captured()
    access = logging.getLogger(f"test.access.{uuid.uuid4().hex}")
    access.setLevel(logging.INFO)
    loggers = [logging.getLogger("tierbatch.api.errors"), access]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler, access
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.anyio
async def test_a_failing_request_logs_its_id_and_none_of_its_secrets(
        captured: tuple[Captured, logging.Logger]) -> None:
    handler, access = captured
    prompt = f"PROMPT-{uuid.uuid4().hex}"
    app = FastAPI()
    install_error_handlers(app)
    lines = install_request_ids(app, AccessLines(access))

    @app.post("/v1/chat/completions")
    async def chat() -> None:
        # a client library's error that repeats the credentials it sent
        raise RuntimeError(f"request failed: headers={{'authorization': 'Bearer {TENANT_KEY}'}}")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/v1/chat/completions?key=" + PROVIDER_KEY,
                                   json={"messages": [{"role": "user", "content": prompt}]},
                                   headers={"Authorization": f"Bearer {TENANT_KEY}", "x-request-id": "fail-1"})
    assert response.status_code == 500
    lines.flush()  # the access line, kept until then
    logged = [json.loads(line) for line in handler.lines]
    assert {line["logger"] for line in logged} == {"tierbatch.api.errors", access.name}
    assert all(line["request_id"] == "fail-1" for line in logged)
    text = "\n".join(handler.lines)
    assert prompt not in text
    assert TENANT_KEY not in text and PROVIDER_KEY not in text
