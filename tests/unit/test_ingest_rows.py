"""The COPY text that batch ingestion writes into `ingest_rows` (tierbatch/batching/ingest.py `_success_rows`)."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import orjson

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.batching.ingest import _copy_field, _success_rows, classify_lines
from tierbatch.db.bulk_sql import INGEST_COLUMNS
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.tasks.labels import label_response_format

_UNESCAPE = {"\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t"}


def _parse(copy_text: str) -> list[dict[str, str | None]]:
    rows = []
    for line in copy_text.split("\n")[:-1]:  # the data ends with a newline
        fields = [None if f == "\\N" else re.sub(r"\\[\\nrt]", lambda m: _UNESCAPE[m.group(0)], f)
                  for f in line.split("\t")]
        assert len(fields) == len(INGEST_COLUMNS)
        rows.append(dict(zip(INGEST_COLUMNS, fields, strict=True)))
    return rows


class _Session:
    """Answers `_LABELLED_REQUESTS` with the given (response format, ids) groups (no watch column asked)."""

    def __init__(self, groups: list[tuple[dict[str, Any], list[uuid.UUID]]]) -> None:
        self.groups = groups

    def execute(self, *_args: Any) -> list[SimpleNamespace]:
        return [SimpleNamespace(response_format=orjson.dumps(fmt).decode(), ids=[str(i) for i in ids], watch=None,
                                cacheable=None)
                for fmt, ids in self.groups]


def _body(content: str, prompt_tokens: int = 40) -> dict[str, Any]:
    return {"model": "gpt-4o-mini-2024-07-18", "choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 6,
                      "prompt_tokens_details": {"cached_tokens": 0}}}


def test_fields_are_escaped_priced_and_labels_checked() -> None:
    prices = PriceBook(parse_config(default_config_data(), environ={}))
    batch = SimpleNamespace(provider="sim", model="gpt-4o-mini")
    tricky, good, bad, other = (uuid.uuid4() for _ in range(4))
    successes = {
        tricky: _body('a\tb\nc\\d\r "quoted" \\n literal'),
        good: _body('{"label": "billing"}'),
        bad: _body('{"label": "nonsense"}'),
        other: _body('{"label": "billing"}', prompt_tokens=41),
    }
    session = _Session([(label_response_format(["billing", "bug"]), [good, bad, other])])
    copy_data, watch, _ = _success_rows(session, prices, batch, successes, None)  # type: ignore[arg-type]
    assert watch == []  # nothing asked for the quality monitor
    rows = {uuid.UUID(r["id"] or ""): r for r in _parse(copy_data.decode())}

    assert rows[tricky]["output"] == 'a\tb\nc\\d\r "quoted" \\n literal'
    assert orjson.loads(rows[tricky]["response"] or "") == successes[tricky]
    assert rows[tricky]["status"] == "succeeded" and rows[tricky]["error"] is None
    assert rows[good]["status"] == "succeeded"
    assert rows[bad]["status"] == "failed" and "not one of the labels" in (rows[bad]["error"] or "")
    for task_id, body in successes.items():  # priced line by line, memo or not
        usage = TokenUsage(body["usage"]["prompt_tokens"], 0, 6)
        priced = prices.price("sim", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", usage, batch=True)
        assert priced is not None
        assert Decimal(rows[task_id]["cost_usd"] or "") == priced.total
        assert rows[task_id]["input_tokens"] == str(usage.input_tokens)
        assert Decimal(rows[task_id]["baseline_cost_usd"] or "") == prices.baseline(usage)


def test_copy_field_null_empty_and_decimal() -> None:
    assert _copy_field(None) == "\\N"
    assert _copy_field("") == ""
    assert _copy_field(Decimal("0.000000125")) == str(Decimal("0.000000125"))


def test_same_usage_is_priced_by_each_served_model() -> None:
    prices = PriceBook(parse_config(default_config_data(), environ={}))
    batch = SimpleNamespace(provider="sim", model="gpt-4o-mini")
    known, unknown, fallback = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    successes = {known: _body("a"), unknown: {**_body("a"), "model": "no-such-model-anywhere"},
                 fallback: {k: v for k, v in _body("a").items() if k != "model"}}
    copy_data, _, _ = _success_rows(_Session([]), prices, batch, successes, None)  # type: ignore[arg-type]
    rows = {uuid.UUID(r["id"] or ""): r for r in _parse(copy_data.decode())}

    usage = TokenUsage(40, 0, 6)
    mini = prices.price("sim", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", usage, batch=True)
    assert mini is not None and Decimal(rows[known]["cost_usd"] or "") == mini.total
    # an unknown served model is priced by the requested one; no served model at all is the requested one
    requested = prices.price("sim", "gpt-4o-mini", "gpt-4o-mini", usage, batch=True)
    assert requested is not None
    assert Decimal(rows[unknown]["cost_usd"] or "") == requested.total
    assert rows[unknown]["served_model"] == "no-such-model-anywhere"
    assert rows[fallback]["served_model"] == "gpt-4o-mini"


def test_hostile_lines_are_skipped_or_kept_as_errors_never_raised() -> None:
    good, odd_body, odd_status = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    lines = [
        "not json",
        '{"custom_id": 12, "response": {"status_code": 200, "body": {}}}',
        '{"custom_id": ["x"], "response": null}',
        '{"custom_id": "not-a-uuid", "response": {"status_code": 200, "body": {}}}',
        '{"response": {"status_code": 200, "body": {}}}',
        orjson.dumps({"custom_id": str(good), "response": {"status_code": 200, "body": _body("ok")}}).decode(),
        orjson.dumps({"custom_id": str(odd_body), "response": {"status_code": 200, "body": "text"}}).decode(),
        orjson.dumps({"custom_id": str(odd_status), "response": {"status_code": "teapot", "body": None}}).decode(),
    ]
    outcomes = classify_lines(lines)
    assert outcomes.successes == {good: _body("ok"), odd_body: {}}
    assert list(outcomes.permanent) == [odd_status] and not outcomes.retryable
    assert outcomes.permanent[odd_status].startswith("batch line HTTP 0:")
