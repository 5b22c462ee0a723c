"""CSV cells that cannot run as spreadsheet formulas, and Content-Disposition headers for any file name."""

from __future__ import annotations

import csv
import email.utils
import io
from email.message import Message

import pytest

from tierbatch.api.downloads import content_disposition
from tierbatch.base.csv_safety import safe_cell
from tierbatch.cli.costs import write_csv


@pytest.mark.parametrize("value", ['=HYPERLINK("http://evil.example/","x")', "@SUM(A1:A9)", "+1+1", "-2+3",
                                   "\t=1", "\r=1", "=", "=cmd|' /C calc'!A0"])
def test_a_formula_prefix_gets_an_apostrophe(value: str) -> None:
    assert safe_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["", "billing", "item-1", "1+1", " =1", "'=1", "ticket = open", "café"])
def test_other_text_is_left_as_it_is(value: str) -> None:
    assert safe_cell(value) == value


def _decoded_name(header: str) -> str:
    """How an RFC 6266 client reads the header: the extended `filename*` (RFC 5987) when present, decoded by
    the standard library's RFC 2231 parser, else the plain `filename`."""
    message = Message()
    message["content-disposition"] = header
    params = message.get_params(header="content-disposition") or []
    extended = [value for key, value in params if key == "filename" and isinstance(value, tuple)]
    if extended:
        assert len(extended) == 1 and extended[0][0] == "UTF-8"
        return email.utils.collapse_rfc2231_value(extended[0])
    plain = [value for key, value in params if key == "filename"]
    assert len(plain) == 1 and isinstance(plain[0], str)
    return plain[0]


@pytest.mark.parametrize("name", ["results.csv", "отчёт.jsonl", "報告 2026.jsonl", 'a"b.jsonl', "a\\b.jsonl",
                                  "line\r\nSet-Cookie: x=1.jsonl", "100% done;.jsonl", "tab\there.jsonl",
                                  "emoji-😀.jsonl"])
def test_any_name_makes_a_latin1_single_line_header_that_reads_back(name: str) -> None:
    header = content_disposition(name)
    header.encode("latin-1")  # what an HTTP server must be able to send
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert header.startswith('attachment; filename="')
    assert "filename*=UTF-8''" in header
    assert _decoded_name(header) == name
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback.isprintable() and "%" not in fallback and "\\" not in fallback


def test_the_ascii_fallback_keeps_a_plain_name_and_stands_in_for_an_empty_one() -> None:
    assert content_disposition("job-1.csv") == "attachment; filename=\"job-1.csv\"; filename*=UTF-8''job-1.csv"
    assert _decoded_name(content_disposition("")) == "download"


def test_cost_csv_neutralises_tenant_names_and_keeps_negative_figures(capsys: pytest.CaptureFixture[str]) -> None:
    body = {"group_by": ["task_type"], "rows": [
        {"task_type": "=HYPERLINK(\"http://evil.example/\")", "requests": 2, "cost_usd": "0.5",
         "savings_usd": "-0.25", "savings_pct": -12.5},
        {"task_type": "classification", "requests": 1, "cost_usd": "0.1", "savings_usd": "0.1",
         "savings_pct": 50.0}]}
    write_csv(body, report=False)
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["task_type"] == "'=HYPERLINK(\"http://evil.example/\")"
    assert (rows[0]["savings_usd"], rows[0]["savings_pct"]) == ("-0.25", "-12.5")
    assert rows[1]["task_type"] == "classification"
