"""Schedules without services: cron and time zones, the catch-up policy, validation of a schedule,
file sources confined to the tenant's directory, SQL (SQLite) sources declared by the operator, cursors,
CSV cells safe from formulas, and webhook signatures."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tierbatch.api.errors import status_of
from tierbatch.base.config import AppConfig, SqlSourceConfig
from tierbatch.base.csv_safety import safe_cell, safe_row
from tierbatch.base.errors import InvalidInput
from tierbatch.db.models import Schedule, ScheduleRun
from tierbatch.schedules.classifications import text_hash
from tierbatch.schedules.file_sources import _rows_of, _StoredFileReader, read_files
from tierbatch.schedules.sinks import sink_path
from tierbatch.schedules.source_rows import SourceError
from tierbatch.schedules.spec import (
    TenantScope,
    check_cron,
    check_timezone,
    latest_fire_at_or_before,
    next_fire_after,
    parse_schedule,
)
from tierbatch.schedules.sql_sources import CursorTracker, decode_cursor, encode_cursor, read_sql, sqlalchemy_url
from tierbatch.schedules.tenant_files import PathRefused, TenantFiles, open_tenant_file
from tierbatch.webhooks.delivery import backoff_seconds
from tierbatch.worker.schedules import parse_now

UTC = dt.UTC
BASE_CONFIG: dict[str, Any] = {
    "providers": {"sim": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "SIM_API_KEY"}},
    "tiers": {"light": {"provider": "sim", "model": "small"}, "complex": {"provider": "sim", "model": "big"}},
    "routing": {"classification": "light"},
    "sources": {"tickets": {"url_env": "TICKETS_DB_URL", "tenants": ["acme"]},
                "finance": {"url_env": "FINANCE_DB_URL", "tenants": ["someone-else"]}},
}
CONFIG = AppConfig.model_validate({**BASE_CONFIG, "files": {"root": "/nonexistent/tierbatch-files"}})
NO_FILES = AppConfig.model_validate(BASE_CONFIG)
TENANT = uuid.UUID("11111111-2222-3333-4444-555555555555")
SCOPE = TenantScope(TENANT, "acme", has_file=lambda file_id: file_id == "file-" + "a" * 24)
LABELS = ["billing", "account", "bug"]


def schedule(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "nightly-tickets", "cron": "0 2 * * *", "timezone": "Europe/Paris",
        "job": {"tier": "light", "system": "Route the support ticket.", "template": "Ticket: {text}",
                "labels": LABELS},
        "source": {"type": "file", "path": "tickets/*.csv", "format": "csv", "id_field": "id",
                   "text_field": "body"},
        "sink": {"type": "file", "path": "out/{run_id}.jsonl"},
        "webhook_url": "https://example.internal/hooks/tickets",
    }
    body.update(changes)
    return body


def refused(payload: Any, config: AppConfig = CONFIG, scope: TenantScope = SCOPE) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_schedule(payload, config, scope)
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
    assert error.param == "cron" and status_of(error) == 422
    assert words in error.message


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "Europe", "../etc/passwd", "", "Europe/Pariss"])
def test_unknown_time_zone_is_refused(zone: str) -> None:
    error = refused(schedule(timezone=zone))
    assert error.param == "timezone" and status_of(error) == 422


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
    spec = parse_schedule(schedule(), CONFIG, SCOPE)
    assert spec.cron == "0 2 * * *" and spec.timezone == "Europe/Paris" and spec.enabled
    assert spec.job["task_type"] == "classification" and spec.job["labels"] == LABELS
    assert spec.job["tier"] == "light" and spec.job["urgent"] is False
    assert spec.source == {"type": "file", "path": "tickets/*.csv", "format": "csv", "id_field": "id",
                           "text_field": "body"}
    assert spec.sink == {"type": "file", "path": "out/{run_id}.jsonl", "format": "auto"}
    json.dumps(spec.job)  # stored as JSONB


SQL = {"type": "sql", "source": "tickets", "id_field": "id", "text_field": "body", "cursor_field": "updated_at",
       "query": "select id, body, updated_at from tickets where updated_at > :cursor order by updated_at"}


def test_a_declared_sql_source_granted_to_the_tenant_is_accepted() -> None:
    spec = parse_schedule(schedule(source=SQL), CONFIG, SCOPE)
    assert spec.source["source"] == "tickets" and spec.source["cursor_field"] == "updated_at"
    assert "url_env" not in spec.source
    # granted by id as well as by name
    by_id = AppConfig.model_validate({**BASE_CONFIG, "sources": {"tickets": {"url_env": "X_URL",
                                                                              "tenants": [str(TENANT)]}}})
    renamed = TenantScope(TENANT, "renamed")
    assert parse_schedule(schedule(source=SQL, sink=None), by_id, renamed).source["source"] == "tickets"


def test_unknown_and_ungranted_sql_sources_get_the_same_answer() -> None:
    unknown = refused(schedule(source={**SQL, "source": "nope"}))
    others = refused(schedule(source={**SQL, "source": "finance"}))
    assert unknown.param == others.param == "source.source" and status_of(unknown) == status_of(others) == 422
    assert unknown.message.replace("'nope'", "X") == others.message.replace("'finance'", "X")
    assert "FINANCE_DB_URL" not in others.message


def test_url_env_in_a_schedule_is_refused() -> None:
    for source in ({**SQL, "url_env": "TICKETS_DB_URL"},
                   {"type": "sql", "url_env": "HOME", "query": "select 1"}):
        error = refused(schedule(source=source))
        assert error.param == "source.url_env" and "[sources.NAME]" in error.message


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
    spec = parse_schedule(schedule(job={"task_type": "summarization", "template": "Summarize: {text}"}), CONFIG, SCOPE)
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
    ({"type": "file", "path": "/etc/passwd"}, "source.path", "absolute"),
    ({"type": "file", "path": "~/x.csv"}, "source.path", "absolute"),
    ({"type": "file", "path": "../../etc/passwd"}, "source.path", "'..'"),
    ({"type": "file", "path": "a/../../b.csv"}, "source.path", "'..'"),
    ({"type": "file", "path": "x\x00.csv"}, "source.path", "NUL"),
    ({"type": "file", "path": "x.csv", "format": "xml"}, "source.format", ""),
    ({"type": "file", "file_id": "file-" + "b" * 24}, "source.file_id", "no uploaded file"),
    ({"type": "file", "file_id": "../etc/passwd"}, "source.file_id", "no uploaded file"),
    ({"type": "file", "file_id": "file-" + "a" * 24, "path": "x.csv"}, "source.file_id", "not both"),
    ({"type": "sql", "source": "tickets", "query": "select * from t where u > :cursor"}, "source", "cursor_field"),
    ({"type": "sql", "source": "tickets", "query": "select * from t", "cursor_field": "u"}, "source", ":cursor"),
    ({"type": "sql", "source": "tickets"}, "source.query", "required"),
    ({"type": "sql", "query": "select 1"}, "source.source", "required"),
])
def test_bad_sources_name_the_field(source: Any, param: str, words: str) -> None:
    error = refused(schedule(source=source))
    assert error.param == param, error.message
    assert words in error.message


def test_an_uploaded_file_of_the_tenant_is_a_source() -> None:
    spec = parse_schedule(schedule(source={"type": "file", "file_id": "file-" + "a" * 24, "format": "csv",
                                           "text_field": "body"}), CONFIG, SCOPE)
    assert spec.source == {"type": "file", "file_id": "file-" + "a" * 24, "format": "csv", "id_field": "id",
                           "text_field": "body"}
    # no [files] root is needed for it
    parse_schedule(schedule(source=spec.source, sink=None), NO_FILES, SCOPE)


def test_without_a_files_root_paths_are_refused_saying_how_to_enable_them() -> None:
    for body, param in ((schedule(sink=None), "source.path"),
                        (schedule(source={**SQL}), "sink.path")):
        error = refused(body, NO_FILES)
        assert error.param == param and "[files] root" in error.message


@pytest.mark.parametrize(("sink", "param"), [
    ({"type": "s3", "path": "x.jsonl"}, "sink.type"),
    ({"type": "file", "path": "/tmp/out.jsonl"}, "sink.path"),
    ({"type": "file", "path": "../other-tenant/out.jsonl"}, "sink.path"),
    ({"type": "file", "path": "out/*.jsonl"}, "sink.path"),
    ({"type": "file", "path": "out/{nope}.jsonl"}, "sink"),
    ({"type": "file", "path": "out/results"}, "sink"),
])
def test_bad_sinks_are_refused(sink: Any, param: str) -> None:
    assert refused(schedule(sink=sink)).param == param


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "https://", ""])
def test_bad_webhook_urls_are_refused(url: str) -> None:
    assert refused(schedule(webhook_url=url)).param == "webhook_url"


def test_unknown_top_level_field_and_non_object_body() -> None:
    assert refused(schedule(colour="blue")).param == "colour"
    assert refused([1, 2]).param is None


def _tenant_dir(tmp_path: Path) -> tuple[TenantFiles, Path]:
    files = TenantFiles(tmp_path / "root", TENANT)
    files.directory.mkdir(parents=True)
    return files, files.directory


def test_symbolic_links_in_the_tenant_directory_are_refused(tmp_path: Path) -> None:
    config = AppConfig.model_validate({**BASE_CONFIG, "files": {"root": str(tmp_path / "root")}})
    files, home = _tenant_dir(tmp_path)
    (home / "passwd.csv").symlink_to("/etc/passwd")
    (home / "etc").symlink_to("/etc")
    (home / "out").symlink_to(tmp_path)
    for path in ("passwd.csv", "etc/passwd", "etc/*"):
        error = refused(schedule(source={"type": "file", "path": path, "format": "csv"}, sink=None), config)
        assert error.param == "source.path" and "symbolic link" in error.message
    for path in ("out/x.csv", "out/{run_id}.csv"):
        error = refused(schedule(sink={"type": "file", "path": path}), config)
        assert error.param == "sink.path" and "symbolic link" in error.message
    # at fire time too: a file replaced by a link after the schedule was made
    with pytest.raises(PathRefused):
        open_tenant_file(files, "passwd.csv")
    with pytest.raises(PathRefused):
        open_tenant_file(files, "etc/passwd")
    # a glob never sees links
    with pytest.raises(SourceError, match="no file matches"):
        list(read_files({"path": "*", "format": "csv"}, files))
    with pytest.raises(SourceError, match="no file matches"):
        list(read_files({"path": "*/passwd", "format": "csv"}, files))


def test_a_tenant_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "t.csv").write_text("id,text\n1,a\n")
    (tmp_path / "root" / str(TENANT)).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathRefused):
        open_tenant_file(TenantFiles(tmp_path / "root", TENANT), "t.csv")


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    files, home = _tenant_dir(tmp_path)
    os.mkfifo(home / "pipe.csv")
    with pytest.raises(SourceError, match="not a regular file"):
        open_tenant_file(files, "pipe.csv")


def test_a_schedule_named_dots_cannot_climb_out_of_the_sink_directory() -> None:
    named = Schedule(id=uuid.uuid4(), name="..", sink={"path": "{schedule_name}/x.csv"})
    run = ScheduleRun(id=uuid.uuid4(), fire_time=dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert sink_path(named, run) == "_/x.csv"


# --- sources ------------------------------------------------------------------------------------------------

def test_csv_and_jsonl_files_matched_by_a_glob_are_read_in_name_order(tmp_path: Path) -> None:
    files, home = _tenant_dir(tmp_path)
    (home / "b.csv").write_text('id,body\n3,"third, with comma"\n4,\n')
    (home / "a.jsonl").write_text('{"id": 1, "body": "first"}\n\n{"id": "2", "body": "second"}\n')
    (home / "ignored.txt").write_text("x")
    (home / ".hidden.csv").write_text("id,body\n9,hidden\n")
    rows = list(read_files({"path": "*.*sv*", "format": "auto", "id_field": "id", "text_field": "body"}, files))
    assert [(r.item_id, r.text) for r in rows] == [("3", "third, with comma"), ("4", None)]
    rows = list(read_files({"path": "[ab].*", "id_field": "id", "text_field": "body"}, files))
    assert [(r.item_id, r.text) for r in rows] == [("1", "first"), ("2", "second"), ("3", "third, with comma"),
                                                    ("4", None)]
    (home / "sub" / "deeper").mkdir(parents=True)
    (home / "sub" / "deeper" / "c.csv").write_text("id,body\n5,fifth\n")
    rows = list(read_files({"path": "sub/*/c.csv", "id_field": "id", "text_field": "body"}, files))
    assert [(r.item_id, r.text) for r in rows] == [("5", "fifth")]


SECRET_HEADER = "ssn,card_number,password_hash"


@pytest.mark.parametrize(("content", "name", "words"), [
    ("id,text\n1,a\n", "x.csv", "no column named 'body'"),
    (SECRET_HEADER + "\n1,2,3\n", "x.csv", "no column named 'id'"),
    ("", "x.csv", "empty"),
    ('{"id": 1, "body": "a"}\nnot json root:x:0:0\n', "x.jsonl", "x.jsonl:2: not valid JSON"),
    ('{"body": "a"}\n', "x.jsonl", "no 'id' field"),
    ('{"id": 1, "body": 5}\n', "x.jsonl", "must be a string"),
    ("id,body\n,a\n", "x.csv", "x.csv:2"),
    ("id,body\n1,a\n", "x.xml", "cannot tell the format"),
    ("[" * 100_000 + "\n", "x.jsonl", "not valid JSON"),
])
def test_bad_files_fail_with_the_place_and_never_quote_the_content(tmp_path: Path, content: str, name: str,
                                                                   words: str) -> None:
    files, home = _tenant_dir(tmp_path)
    (home / name).write_text(content)
    with pytest.raises(SourceError) as caught:
        list(read_files({"path": name, "id_field": "id", "text_field": "body"}, files))
    reason = str(caught.value)
    assert words in reason
    for secret in ("ssn", "card_number", "password_hash", "root:x", "text\n"):
        assert secret not in reason
    assert str(tmp_path) not in reason  # nor the operator's directories


def test_missing_files_fail(tmp_path: Path) -> None:
    files, home = _tenant_dir(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        list(read_files({"path": "nope.csv"}, files))
    with pytest.raises(SourceError, match="no file matches"):
        list(read_files({"path": "*.csv"}, files))
    (home / "dir.csv").mkdir()
    with pytest.raises(SourceError, match="not a regular file"):
        list(read_files({"path": "dir.csv"}, files))
    with pytest.raises(SourceError, match="does not exist"):
        list(read_files({"path": "x.csv"}, TenantFiles(tmp_path / "root", uuid.uuid4())))


def test_an_uploaded_file_is_read_part_by_part() -> None:
    content = "id,body\n1,café crème\n2,\"two, lines\nhere\"\n3,third\n".encode()
    cut = content.index("é".encode()) + 1  # a part ends inside a character, another inside a quoted field
    parts = [content[:cut], content[cut:cut + 9], content[cut + 9:]]
    fetched: list[int] = []

    def fetch(part: int) -> bytes | None:
        fetched.append(part)
        return parts[part] if part < len(parts) else None

    stream = io.BufferedReader(_StoredFileReader(fetch), buffer_size=4)
    rows = list(_rows_of(stream, "file-x", "csv", "id", "body"))
    assert [(r.item_id, r.text) for r in rows] == [("1", "café crème"), ("2", "two, lines\nhere"), ("3", "third")]
    assert fetched == [0, 1, 2, 3]


def _sqlite(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("create table tickets (id integer primary key, body text, updated_at integer)")
        conn.executemany("insert into tickets values (?, ?, ?)", [(i, f"ticket {i}", 100 + i) for i in range(1, 6)])
    return f"sqlite:///{path}"


TICKETS = SqlSourceConfig(url_env="TICKETS_DB_URL", tenants=["acme"])


def test_sql_source_reads_after_the_cursor(tmp_path: Path) -> None:
    env = {"TICKETS_DB_URL": _sqlite(tmp_path / "t.db")}
    spec = {"type": "sql", "source": "tickets", "id_field": "id", "text_field": "body",
            "cursor_field": "updated_at",
            "query": "select id, body, updated_at from tickets where updated_at > :cursor order by updated_at"}
    rows = list(read_sql(spec, 102, TICKETS, env))
    assert [(r.item_id, r.text, r.cursor) for r in rows] == [("3", "ticket 3", 103), ("4", "ticket 4", 104),
                                                            ("5", "ticket 5", 105)]


@pytest.mark.parametrize(("env", "query", "words"), [
    ({}, "select 1", "source tickets is not available"),
    ({"TICKETS_DB_URL": "not-a-url"}, "select 1", "source tickets is not available"),
    ({"TICKETS_DB_URL": "postgresql://u:pw@127.0.0.1:1/db"}, "select 1", "source tickets is not available"),
    (None, "select id, body from no_such_table", "source query failed"),
    (None, "select id from tickets", "no column 'body'"),
    (None, "insert into tickets values (9, 'x', 1) returning id, body", "source query failed"),
    (None, "select id, body from tickets; delete from tickets", "source query failed"),
])
def test_sql_source_failures_are_source_errors_that_name_no_variable(
        tmp_path: Path, env: dict[str, str] | None, query: str, words: str) -> None:
    database = _sqlite(tmp_path / "t.db")
    environ = env if env is not None else {"TICKETS_DB_URL": database}
    spec = {"type": "sql", "source": "tickets", "query": query, "id_field": "id", "text_field": "body"}
    with pytest.raises(SourceError) as caught:
        list(read_sql(spec, None, TICKETS, environ))
    assert words in str(caught.value)
    assert "TICKETS_DB_URL" not in str(caught.value) and "pw" not in str(caught.value)
    with sqlite3.connect(tmp_path / "t.db") as conn:  # read only: nothing written, nothing deleted
        assert conn.execute("select count(*) from tickets").fetchone() == (5,)


def test_sql_source_caps_rows_and_time(tmp_path: Path) -> None:
    env = {"TICKETS_DB_URL": _sqlite(tmp_path / "t.db")}
    spec = {"type": "sql", "source": "tickets", "query": "select id, body from tickets", "text_field": "body"}
    assert len(list(read_sql(spec, None, SqlSourceConfig(url_env="TICKETS_DB_URL", max_rows=5), env))) == 5
    with pytest.raises(SourceError, match="more than 4 rows"):
        list(read_sql(spec, None, SqlSourceConfig(url_env="TICKETS_DB_URL", max_rows=4), env))
    slow = {**spec, "query": "with recursive n(i) as (select 1 union all select i + 1 from n) "
                             "select i as id, 'x' as body from n where i < 0"}
    with pytest.raises(SourceError, match="source query failed: interrupted"):
        list(read_sql(slow, None, SqlSourceConfig(url_env="TICKETS_DB_URL", statement_timeout_seconds=0.3), env))


def test_sql_source_refuses_tierbatchs_own_database() -> None:
    own = "postgresql+psycopg://root@127.0.0.1:5432/tierbatch"
    spec = {"type": "sql", "source": "x", "query": "select 1"}
    with pytest.raises(SourceError, match="source x is not available"):
        list(read_sql(spec, None, SqlSourceConfig(url_env="X"), {"X": "postgresql://root@127.0.0.1/tierbatch"},
                      own))
    assert sqlalchemy_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize(("section", "words"), [
    ({"url_env": "DATABASE_URL"}, "tierbatch's own"),
    ({"url_env": "TIERBATCH_ADMIN_TOKEN"}, "tierbatch's own"),
    ({"url_env": "1BAD"}, "environment variable"),
    ({"url_env": "SIM_API_KEY"}, "provider key"),
    ({"url_env": "X", "statement_timeout_seconds": 0}, "greater than 0"),
    ({"url_env": "X", "max_rows": 0}, "greater than 0"),
])
def test_bad_source_sections_are_config_errors(section: dict[str, Any], words: str) -> None:
    from tierbatch.base.config import parse_config
    from tierbatch.base.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE_CONFIG, "sources": {"db": section}}, environ={"SIM_API_KEY": "k"})
    assert words in str(caught.value)


def test_files_root_must_be_absolute() -> None:
    from tierbatch.base.config import parse_config
    from tierbatch.base.errors import ConfigError

    with pytest.raises(ConfigError, match=r"files\.root"):
        parse_config({**BASE_CONFIG, "files": {"root": "relative/dir"}}, environ={"SIM_API_KEY": "k"})


# --- CSV cells ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("=HYPERLINK(\"http://evil\",\"x\")", "'=HYPERLINK(\"http://evil\",\"x\")"), ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tcmd", "'\tcmd"), ("\rcmd", "'\rcmd"),
    ("billing", "billing"), ("a=b", "a=b"), ("", ""), (None, None), (3, 3),
])
def test_formula_cells_are_neutralised(value: Any, expected: Any) -> None:
    assert safe_cell(value) == expected
    assert safe_row({"a": value}) == {"a": expected}


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

    from tierbatch.webhooks.signing import new_secret, signed_headers

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

    from tierbatch.base.config import WebhooksConfig
    from tierbatch.webhooks.delivery import WebhookCall, deliver
    from tierbatch.webhooks.signing import new_secret

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    call = WebhookCall("schedule run", uuid.uuid4(), 1, f"http://127.0.0.1:{port}/hook", b"{}", new_secret(),
                       "schedule_run.finished")
    result = deliver(call, WebhooksConfig(allow_private_networks=True, timeout_seconds=2))
    assert not result.delivered and result.status_code is None and result.error
