"""Schedules without services: cron and time zones, the catch-up policy, validation of a schedule,
file and SQL (SQLite) sources, cursors, and webhook signatures."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.config import AppConfig
from core.errors import InvalidInput
from core.schedules import (
    check_cron,
    check_timezone,
    latest_fire_at_or_before,
    next_fire_after,
    parse_schedule,
    text_hash,
)
from core.sources import (
    CursorTracker,
    SourceError,
    check_under_roots,
    decode_cursor,
    encode_cursor,
    read_files,
    read_sql,
    sqlalchemy_url,
)
from core.webhooks import backoff_seconds
from worker.schedules import parse_now

UTC = dt.UTC
CONFIG = AppConfig.model_validate({
    "providers": {"sim": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "SIM_API_KEY"}},
    "tiers": {"light": {"provider": "sim", "model": "small"}, "complex": {"provider": "sim", "model": "big"}},
    "routing": {"classification": "light"},
})
LABELS = ["billing", "account", "bug"]


def schedule(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "nightly-tickets", "cron": "0 2 * * *", "timezone": "Europe/Paris",
        "job": {"tier": "light", "system": "Route the support ticket.", "template": "Ticket: {text}",
                "labels": LABELS},
        "source": {"type": "file", "path": "/data/tickets/*.csv", "format": "csv", "id_field": "id",
                   "text_field": "body"},
        "sink": {"type": "file", "path": "/data/out/{run_id}.jsonl"},
        "webhook_url": "https://example.internal/hooks/tickets",
    }
    body.update(changes)
    return body


def refused(payload: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_schedule(payload, CONFIG)
    return caught.value


# --- cron, time zones, catch-up -------------------------------------------------------------------------

@pytest.mark.parametrize("expression", ["0 2 * * *", "*/5 * * * *", "0 9 * * 1-5", "@daily", "@HOURLY",
                                        "  0   2 * * *  "])
def test_valid_cron_expressions_are_normalized(expression: str) -> None:
    normalized = check_cron(expression)
    assert normalized == " ".join(expression.split()) or normalized == expression.strip().lower()


@pytest.mark.parametrize(("expression", "words"), [
    ("61 * * * *", "not a valid cron"), ("* * * *", "5 fields"), ("* * * * * *", "5 fields"),
    ("@sometimes", "unknown alias"), ("", "cron expression"), ("0 0 31 2 *", "never fires"),
    ("banana", "5 fields"),
])
def test_invalid_cron_is_refused_naming_the_field(expression: str, words: str) -> None:
    error = refused(schedule(cron=expression))
    assert error.param == "cron" and error.status_code == 422
    assert words in error.message


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "Europe", "../etc/passwd", "", "Europe/Pariss"])
def test_unknown_time_zone_is_refused(zone: str) -> None:
    error = refused(schedule(timezone=zone))
    assert error.param == "timezone" and error.status_code == 422


def test_known_time_zones() -> None:
    assert check_timezone("UTC") == "UTC"
    assert check_timezone("America/New_York") == "America/New_York"


def test_fire_times_follow_the_schedule_time_zone() -> None:
    # 02:00 in Paris is 01:00 UTC in winter and 00:00 UTC in summer
    winter = next_fire_after("0 2 * * *", "Europe/Paris", dt.datetime(2026, 1, 10, 12, 0, tzinfo=UTC))
    assert winter == dt.datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    summer = next_fire_after("0 2 * * *", "Europe/Paris", dt.datetime(2026, 7, 10, 12, 0, tzinfo=UTC))
    assert summer == dt.datetime(2026, 7, 11, 0, 0, tzinfo=UTC)
    assert winter.tzinfo is not None


def test_next_fire_is_strictly_after_and_latest_is_at_or_before() -> None:
    slot = dt.datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert next_fire_after("* * * * *", "UTC", slot) == slot + dt.timedelta(minutes=1)
    assert latest_fire_at_or_before("* * * * *", "UTC", slot) == slot
    assert latest_fire_at_or_before("* * * * *", "UTC", slot + dt.timedelta(seconds=59)) == slot


def test_catch_up_after_three_missed_slots_is_the_latest_slot_only() -> None:
    """The policy: one run, for the latest fire time that has passed."""
    missed_from = dt.datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    now = missed_from + dt.timedelta(minutes=3, seconds=20)
    assert latest_fire_at_or_before("* * * * *", "UTC", now) == missed_from + dt.timedelta(minutes=3)
    assert next_fire_after("* * * * *", "UTC", now) == missed_from + dt.timedelta(minutes=4)


def test_parse_now() -> None:
    assert parse_now("2026-03-01T10:00:30+00:00") == dt.datetime(2026, 3, 1, 10, 0, 30, tzinfo=UTC)
    assert parse_now("2026-03-01T10:00:30").tzinfo is UTC
    assert parse_now(None).tzinfo is not None


# --- validating a schedule ---------------------------------------------------------------------------------

def test_the_design_example_is_accepted_and_normalized() -> None:
    spec = parse_schedule(schedule(), CONFIG)
    assert spec.cron == "0 2 * * *" and spec.timezone == "Europe/Paris" and spec.enabled
    assert spec.job["task_type"] == "classification" and spec.job["labels"] == LABELS
    assert spec.job["tier"] == "light" and spec.job["urgent"] is False
    assert spec.source == {"type": "file", "path": "/data/tickets/*.csv", "format": "csv", "id_field": "id",
                           "text_field": "body"}
    assert spec.sink == {"type": "file", "path": "/data/out/{run_id}.jsonl", "format": "auto"}
    json.dumps(spec.job)  # stored as JSONB


def test_sql_source_of_the_design_is_accepted() -> None:
    spec = parse_schedule(schedule(source={
        "type": "sql", "url_env": "TICKETS_DB_URL",
        "query": "select id, body, updated_at from tickets where updated_at > :cursor order by updated_at",
        "id_field": "id", "text_field": "body", "cursor_field": "updated_at"}), CONFIG)
    assert spec.source["url_env"] == "TICKETS_DB_URL" and spec.source["cursor_field"] == "updated_at"


@pytest.mark.parametrize(("missing", "param"), [("name", "name"), ("cron", "cron"), ("job", "job"),
                                                 ("source", "source")])
def test_missing_fields_are_named(missing: str, param: str) -> None:
    body = schedule()
    del body[missing]
    error = refused(body)
    assert error.param == param and "required" in error.message.lower()


def test_labels_are_required_for_a_classification_schedule() -> None:
    for job in ({"template": "Ticket: {text}"}, {"task_type": "classification", "tier": "light"}):
        error = refused(schedule(job=job))
        assert error.param == "job.labels" and "required" in error.message
    # another kind of task needs none
    spec = parse_schedule(schedule(job={"task_type": "summarization", "template": "Summarize: {text}"}), CONFIG)
    assert spec.job["labels"] is None


@pytest.mark.parametrize(("job", "param"), [
    ({"labels": []}, "job.labels"),
    ({"labels": ["a", "a"]}, "job.labels[1]"),
    ({"labels": LABELS, "template": "no slot"}, "job.template"),
    ({"labels": LABELS, "tier": "medium"}, "job.tier"),
    ({"labels": LABELS, "deadline": "2026-01-01T00:00:00Z"}, "job.deadline"),
    ({"labels": LABELS, "deadline_seconds": 0}, "job.deadline_seconds"),
    ({"labels": LABELS, "colour": "blue"}, "job.colour"),
    ({"labels": LABELS, "params": {"temperature": 9}}, "job.params.temperature"),
    ({"labels": LABELS, "params": {"response_format": {"type": "json_object"}}}, "job.params.response_format"),
])
def test_bad_job_templates_name_the_field(job: dict[str, Any], param: str) -> None:
    error = refused(schedule(job=job))
    assert error.param == param, error.message
    assert error.message.startswith(param)


@pytest.mark.parametrize(("source", "param", "words"), [
    ({"type": "ftp", "path": "/x"}, "source.type", "unknown source type"),
    ({"path": "/x.csv"}, "source.type", "required"),
    ("a string", "source", "object"),
    ({"type": "file"}, "source.path", "required"),
    ({"type": "file", "path": "relative/*.csv"}, "source.path", "absolute"),
    ({"type": "file", "path": "/x.csv", "format": "xml"}, "source.format", ""),
    ({"type": "sql", "url_env": "1BAD", "query": "select 1"}, "source.url_env", "environment variable"),
    ({"type": "sql", "url_env": "postgres://u@h/db", "query": "select 1"}, "source.url_env", "never stored"),
    ({"type": "sql", "url_env": "DATABASE_URL", "query": "select 1"}, "source.url_env", "tierbatch's own"),
    ({"type": "sql", "url_env": "TIERBATCH_ADMIN_TOKEN", "query": "select 1"}, "source.url_env", "own"),
    ({"type": "sql", "url_env": "SIM_API_KEY", "query": "select 1"}, "source.url_env", "provider key"),
    ({"type": "sql", "url_env": "DB", "query": "select * from t where u > :cursor"}, "source", "cursor_field"),
    ({"type": "sql", "url_env": "DB", "query": "select * from t", "cursor_field": "u"}, "source", ":cursor"),
    ({"type": "sql", "url_env": "DB"}, "source.query", "required"),
])
def test_bad_sources_name_the_field(source: Any, param: str, words: str) -> None:
    error = refused(schedule(source=source))
    assert error.param == param, error.message
    assert words in error.message


@pytest.mark.parametrize(("sink", "param"), [
    ({"type": "s3", "path": "/x.jsonl"}, "sink.type"),
    ({"type": "file", "path": "out.jsonl"}, "sink.path"),
    ({"type": "file", "path": "/out/{nope}.jsonl"}, "sink"),
    ({"type": "file", "path": "/out/results"}, "sink"),
])
def test_bad_sinks_are_refused(sink: Any, param: str) -> None:
    assert refused(schedule(sink=sink)).param == param


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "https://", ""])
def test_bad_webhook_urls_are_refused(url: str) -> None:
    assert refused(schedule(webhook_url=url)).param == "webhook_url"


def test_unknown_top_level_field_and_non_object_body() -> None:
    assert refused(schedule(colour="blue")).param == "colour"
    assert refused([1, 2]).param is None


def test_roots_restrict_file_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_schedule(schedule(), CONFIG, roots=[str(tmp_path)])
    assert caught.value.param == "source.path"
    inside = schedule(source={"type": "file", "path": str(tmp_path / "*.csv"), "text_field": "body"},
                      sink={"type": "file", "path": str(tmp_path / "out" / "{run_id}.csv")})
    parse_schedule(inside, CONFIG, roots=[str(tmp_path)])
    with pytest.raises(SourceError):
        check_under_roots(str(tmp_path / ".." / "elsewhere.csv"), [str(tmp_path)], "source.path")


# --- sources ------------------------------------------------------------------------------------------------

def test_csv_and_jsonl_files_matched_by_a_glob_are_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text('id,body\n3,"third, with comma"\n4,\n')
    (tmp_path / "a.jsonl").write_text('{"id": 1, "body": "first"}\n\n{"id": "2", "body": "second"}\n')
    (tmp_path / "ignored.txt").write_text("x")
    rows = list(read_files({"path": str(tmp_path / "*.*sv*"), "format": "auto", "id_field": "id",
                            "text_field": "body"}))
    assert [(r.item_id, r.text) for r in rows] == [("3", "third, with comma"), ("4", None)]
    rows = list(read_files({"path": str(tmp_path / "[ab].*"), "id_field": "id", "text_field": "body"}))
    assert [(r.item_id, r.text) for r in rows] == [("1", "first"), ("2", "second"), ("3", "third, with comma"),
                                                    ("4", None)]


@pytest.mark.parametrize(("content", "name", "words"), [
    ("id,text\n1,a\n", "x.csv", "no column 'body'"),
    ("", "x.csv", "empty"),
    ('{"id": 1, "body": "a"}\nnot json\n', "x.jsonl", "x.jsonl:2: not valid JSON"),
    ('{"body": "a"}\n', "x.jsonl", "no 'id' field"),
    ('{"id": 1, "body": 5}\n', "x.jsonl", "must be a string"),
    ("id,body\n,a\n", "x.csv", "x.csv:2"),
    ("id,body\n1,a\n", "x.xml", "cannot tell the format"),
])
def test_bad_files_fail_with_the_place(tmp_path: Path, content: str, name: str, words: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(SourceError) as caught:
        list(read_files({"path": str(tmp_path / name), "id_field": "id", "text_field": "body"}))
    assert words in str(caught.value)


def test_missing_files_fail(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        list(read_files({"path": str(tmp_path / "nope.csv")}))
    with pytest.raises(SourceError, match="no file matches"):
        list(read_files({"path": str(tmp_path / "*.csv")}))
    with pytest.raises(SourceError, match="not a regular file"):
        list(read_files({"path": str(tmp_path)}))


def _sqlite(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("create table tickets (id integer primary key, body text, updated_at integer)")
        conn.executemany("insert into tickets values (?, ?, ?)", [(i, f"ticket {i}", 100 + i) for i in range(1, 6)])
    return f"sqlite:///{path}"


def test_sql_source_reads_after_the_cursor(tmp_path: Path) -> None:
    env = {"TICKETS_DB_URL": _sqlite(tmp_path / "t.db")}
    spec = {"type": "sql", "url_env": "TICKETS_DB_URL", "id_field": "id", "text_field": "body",
            "cursor_field": "updated_at",
            "query": "select id, body, updated_at from tickets where updated_at > :cursor order by updated_at"}
    rows = list(read_sql(spec, 102, env))
    assert [(r.item_id, r.text, r.cursor) for r in rows] == [("3", "ticket 3", 103), ("4", "ticket 4", 104),
                                                            ("5", "ticket 5", 105)]


@pytest.mark.parametrize(("env", "query", "words"), [
    ({}, "select 1", "TICKETS_DB_URL is not set"),
    ({"TICKETS_DB_URL": "not-a-url"}, "select 1", "not a usable database URL"),
    (None, "select id, body from no_such_table", "source query failed"),
    (None, "select id from tickets", "no column 'body'"),
])
def test_sql_source_failures_are_source_errors(tmp_path: Path, env: dict[str, str] | None, query: str,
                                               words: str) -> None:
    environ = env if env is not None else {"TICKETS_DB_URL": _sqlite(tmp_path / "t.db")}
    spec = {"type": "sql", "url_env": "TICKETS_DB_URL", "query": query, "id_field": "id", "text_field": "body"}
    with pytest.raises(SourceError) as caught:
        list(read_sql(spec, None, environ))
    assert words in str(caught.value)


def test_sql_source_refuses_tierbatchs_own_database() -> None:
    own = "postgresql+psycopg://root@127.0.0.1:5432/tierbatch"
    spec = {"type": "sql", "url_env": "X", "query": "select 1"}
    with pytest.raises(SourceError, match="own database"):
        list(read_sql(spec, None, {"X": "postgresql://root@127.0.0.1/tierbatch"}, own))
    assert sqlalchemy_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize("value", [
    dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC), dt.datetime(2026, 1, 2, 3, 4, 5), dt.date(2026, 1, 2),
    42, Decimal("1.50"), 2.5, "abc",
])
def test_cursors_keep_their_type(value: Any) -> None:
    stored = encode_cursor(value)
    assert json.loads(json.dumps(stored)) == stored
    assert decode_cursor(stored) == value and type(decode_cursor(stored)) is type(value)
    assert encode_cursor(None) is None and decode_cursor(None) is None


def test_cursor_tracker_keeps_the_largest() -> None:
    tracker = CursorTracker()
    for value in (3, None, 7, 5):
        tracker.see(value)
    assert tracker.value == 7
    with pytest.raises(SourceError):
        tracker.see("x")


def test_text_hash_is_stable() -> None:
    assert text_hash("héllo") == text_hash("héllo") != text_hash("hello")
    assert len(text_hash("x")) == 64


# --- webhooks -------------------------------------------------------------------------------------------

def test_the_signature_is_standard_webhooks_and_verifies_with_its_library() -> None:
    from datetime import UTC, datetime

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from core.webhooks import new_secret, signed_headers

    secret = new_secret()
    body = b'{"type":"schedule_run.finished"}'
    headers = signed_headers(secret, "msg_1", datetime.now(UTC), body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"type": "schedule_run.finished"}
    for bad_body, bad_secret in ((body + b" ", secret), (body, new_secret())):
        with pytest.raises(WebhookVerificationError):
            Webhook(bad_secret).verify(bad_body, headers)
    stale = signed_headers(secret, "msg_1", datetime(2020, 1, 1, tzinfo=UTC), body)
    with pytest.raises(WebhookVerificationError):  # a replayed old delivery is refused by the receiver
        Webhook(secret).verify(body, stale)


def test_backoff_doubles() -> None:
    assert [backoff_seconds(a) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_seconds(30) == 300.0


def test_a_webhook_that_cannot_be_reached_is_a_failed_attempt_not_an_exception() -> None:
    import socket
    import uuid

    from core.config import WebhooksConfig
    from core.webhooks import WebhookCall, deliver, new_secret

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    call = WebhookCall("schedule run", uuid.uuid4(), 1, f"http://127.0.0.1:{port}/hook", b"{}", new_secret(),
                       "schedule_run.finished")
    result = deliver(call, WebhooksConfig(allow_private_networks=True, timeout_seconds=2))
    assert not result.delivered and result.status_code is None and result.error
