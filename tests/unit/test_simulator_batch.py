"""Batch input validation, answering and output files, without a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tierbatch.simulator.answers import build_answer
from tierbatch.simulator.batch_input import parse_input
from tierbatch.simulator.batch_output import CANCELLED, compute_results, write_results
from tierbatch.simulator.config import ModelSettings
from tierbatch.simulator.tokens import PrefixCache

ENDPOINT = "/v1/chat/completions"


def request_line(custom_id: str, text: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text + "\nLabels: a, b, c"}]}
    line: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    line.update(extra)
    return line


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with open(path, "w") as fh:
        for line in lines:
            fh.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def parse(path: Path, max_lines: int = 50_000, max_bytes: int = 200_000_000) -> Any:
    return parse_input(path, ENDPOINT, max_lines, max_bytes)


def test_valid_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"t{i}", f"ticket {i}") for i in range(10)] + [""])
    parsed = parse(path)
    assert parsed.errors == []
    assert parsed.model == "gpt-4o-mini"
    assert [line.custom_id for line in parsed.lines] == [f"t{i}" for i in range(10)]
    assert parsed.prompt_tokens > 0


@pytest.mark.parametrize(("lines", "code", "line_no"), [
    (["{not json"], "invalid_json_line", 1),
    (["[1, 2]"], "invalid_json_line", 1),
    ([request_line("a", "x"), request_line("a", "y")], "duplicate_custom_id", 2),
    ([request_line("a", "x"), request_line("b", "y", url="/v1/embeddings")], "url_mismatch", 2),
    ([request_line("a", "x"), request_line("b", "y", model="gpt-4o")], "model_mismatch", 2),
    ([request_line("a", "x", method="GET")], "invalid_method", 1),
    ([{"method": "POST", "url": ENDPOINT, "body": {"model": "m", "messages": []}}], "missing_required_parameter", 1),
    ([{"custom_id": "a", "method": "POST", "url": ENDPOINT, "body": {"messages": []}}],
     "missing_required_parameter", 1),
])
def test_line_validation_errors(tmp_path: Path, lines: list[Any], code: str, line_no: int) -> None:
    parsed = parse(write_jsonl(tmp_path / "in.jsonl", lines))
    assert parsed.lines == []
    assert parsed.errors[0]["code"] == code
    assert parsed.errors[0]["line"] == line_no
    assert parsed.errors[0]["message"]


def test_file_level_errors(tmp_path: Path) -> None:
    lines = [request_line(f"t{i}", "x") for i in range(6)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert parse(path, max_lines=5).errors[0]["code"] == "too_many_tasks"
    assert parse(path, max_lines=6).errors == []
    assert parse(path, max_bytes=100).errors[0]["code"] == "file_too_large"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert parse(empty).errors[0]["code"] == "empty_file"


def test_results_are_shuffled_deterministic_and_match_chat(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"t{i}", f"ticket {i}") for i in range(50)])
    parsed = parse(path)
    settings = ModelSettings(agreement=0.7)
    results = compute_results("batch_1", parsed.lines, "gpt-4o-mini", settings, PrefixCache(), 0.0, [], 1)
    ids = results.custom_ids
    assert sorted(ids) == sorted(line.custom_id for line in parsed.lines)
    assert ids != [line.custom_id for line in parsed.lines]
    again = compute_results("batch_1", parsed.lines, "gpt-4o-mini", settings, PrefixCache(), 0.0, [], 1)
    assert again.custom_ids == ids
    by_id = {line.custom_id: line for line in parsed.lines}
    for raw in results.lines:
        out = json.loads(raw)
        assert out["error"] is None and out["response"]["status_code"] == 200
        content = out["response"]["body"]["choices"][0]["message"]["content"]
        expected = build_answer(by_id[out["custom_id"]].body, "gpt-4o-mini", settings).choices[0].content
        assert content == expected


def test_line_errors_and_partial_writes(tmp_path: Path) -> None:
    lines = [request_line(f"t{i}", f"ticket {i}") for i in range(400)]
    lines.append({"custom_id": "bad", "method": "POST", "url": ENDPOINT, "body": {"model": "gpt-4o-mini"}})
    parsed = parse(write_jsonl(tmp_path / "in.jsonl", lines))
    results = compute_results("batch_2", parsed.lines, "gpt-4o-mini", ModelSettings(), PrefixCache(), 0.25,
                              ["http_500", "http_400", "non_http"], 1)
    failed = sum(results.failed)
    assert 60 < failed < 140
    kinds = set()
    for raw, bad in zip(results.lines, results.failed, strict=True):
        out = json.loads(raw)
        if not bad:
            continue
        if out["response"] is None:
            kinds.add("non_http")
            assert out["error"]["code"]
        else:
            kinds.add(out["response"]["status_code"])
            assert out["response"]["body"]["error"]["message"]
        if out["custom_id"] == "bad":  # missing messages: a 400 line, not a batch failure
            assert out["response"]["status_code"] == 400
            assert out["response"]["body"]["error"]["param"] == "messages"
    assert kinds == {"non_http", 400, 500}

    done = 100
    written = write_results(results, done, tmp_path / "out.jsonl", tmp_path / "err.jsonl", CANCELLED)
    out_lines = (tmp_path / "out.jsonl").read_text().splitlines()
    err_lines = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert written.output_lines == len(out_lines) == done - results.failed_before[done]
    assert written.error_lines == len(err_lines) == len(parsed.lines) - len(out_lines)
    assert sum(e["error"] is not None and e["error"]["code"] == "batch_cancelled" for e in err_lines) == \
        len(parsed.lines) - done
    assert written.usage["input_tokens"] > 0


def test_fifty_thousand_lines_are_all_answered(tmp_path: Path) -> None:
    """Its speed is measured by bench/, not asserted here."""
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b", "c"]}}}}}
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(50_000):
            body = {"model": "m", "messages": [{"role": "system", "content": "Classify the ticket."},
                                               {"role": "user", "content": f"Ticket number {i}: it broke"}],
                    "response_format": schema}
            fh.write(json.dumps({"custom_id": f"t{i}", "method": "POST", "url": ENDPOINT, "body": body}) + "\n")
    parsed = parse(path)
    results = compute_results("batch_big", parsed.lines, "m", ModelSettings(), PrefixCache(), 0.01, [], 1)
    write_results(results, len(results.lines), tmp_path / "o.jsonl", tmp_path / "e.jsonl", None)
    assert len(results.lines) == 50_000
    # every line is answered once: in the output file, or (the configured 1% errors) in the error file
    answered = [json.loads(line)["custom_id"] for name in ("o.jsonl", "e.jsonl")
                for line in (tmp_path / name).read_text().splitlines()]
    assert sorted(answered) == sorted(f"t{i}" for i in range(50_000))
