"""`tierbatch audit`: figures checked against arithmetic done by hand in the tests."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.base.states import Tier
from tierbatch.cli.main import app
from tierbatch.costs.audit.estimate import AuditOptions, Auditor
from tierbatch.ledger.pricing import PriceBook

M = Decimal(1_000_000)
T0 = 1_750_000_000  # response `created`, epoch seconds
DAY = 86_400

# Round prices (USD per 1M tokens) through [prices]; api_key_env names a variable nobody sets, to show that the
# audit needs no provider key.
CONFIG_TOML = """
[providers.p]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "TIERBATCH_AUDIT_TEST_KEY_NEVER_SET"
prices_from = "openai"

[tiers.light]
provider = "p"
model = "lite-1"

[tiers.complex]
provider = "p"
model = "big-1"

[routing]
classification = "light"
reasoning = "complex"

[prices."big-1"]
input = 10
cached_input = 5
output = 30
batch_discount = 0.5

[prices."lite-1"]
input = 1
cached_input = 0.5
output = 2
batch_discount = 0.5
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TIERBATCH_CONFIG", raising=False)
    monkeypatch.delenv("TIERBATCH_AUDIT_TEST_KEY_NEVER_SET", raising=False)
    path = tmp_path / "tierbatch.toml"
    path.write_text(CONFIG_TOML)
    return path


def body(content: str, model: str = "big-1", task_type: str | None = None, tier: str | None = None,
         **extra: Any) -> dict[str, Any]:
    metadata = {k: v for k, v in (("task_type", task_type), ("tier", tier)) if v is not None}
    request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    if metadata:
        request["metadata"] = metadata
    return request


def completion(model: str, prompt: int, completion_tokens: int, created: int, cached: int = 0,
               reasoning: int = 0) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached},
                      "completion_tokens_details": {"reasoning_tokens": reasoning}}}


def log_line(request: dict[str, Any], response: dict[str, Any]) -> str:
    return json.dumps({"request": request, "response": response})


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["audit", *args])


def run_json(*args: str) -> dict[str, Any]:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def row(report: dict[str, Any], task_type: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in report["rows"] if r["task_type"] == task_type)
    return found


def write_log(tmp_path: Path) -> Path:
    """Five calls and four lines that cannot be used (lines 3, 5, 7, 8), plus a blank line (6)."""
    lines = [
        # 1: classification → light by [routing]; served by a dated snapshot without a price, so priced as big-1
        log_line(body("Label this review: great product", task_type="classification"),
                 completion("big-1-2025-01-01", 1000, 100, T0, cached=200)),
        # 2: classification → light
        log_line(body("Label this review: it broke", task_type="classification"),
                 completion("big-1", 2000, 500, T0 + DAY)),
        "{this is not json",
        # 4: no task type → general; the prompt heuristic says complex (reasoning cue)
        log_line(body("Explain step by step how to prove that the square root of 2 is irrational"),
                 completion("big-1", 500, 1000, T0 + 2 * DAY, reasoning=400)),
        json.dumps({"request": body("hello")}),
        "",
        log_line(body("hello", task_type="classification"),
                 {"model": "big-1", "created": T0, "usage": {"prompt_tokens": 5}}),
        "[1, 2, 3]",
        # 9: general, short prompt → light; already on the light model
        log_line(body("What is the capital of France?", model="lite-1"), completion("lite-1", 100, 10, T0 + DAY)),
        # 10: classification, but an explicit tier wins over [routing]
        log_line(body("Label this with care", task_type="classification", tier="complex"),
                 completion("big-1", 1000, 0, T0 + DAY)),
    ]
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_log_savings_equal_a_hand_computation(tmp_path: Path, config_file: Path) -> None:
    log = write_log(tmp_path)
    report = run_json(str(log), "--config", str(config_file))

    # big-1 immediate: $10 input, $5 cached input, $30 output per 1M; lite-1: $1, $0.5, $2; batch: half of each.
    # call 1 (light): 800 uncached + 200 cached input, 100 output
    actual_1 = 800 * Decimal(10) / M + 200 * Decimal(5) / M + 100 * Decimal(30) / M  # 0.012
    routed_1 = 800 * Decimal(1) / M + 200 * Decimal("0.5") / M + 100 * Decimal(2) / M  # 0.0011
    batch_1 = 800 * Decimal("0.5") / M + 200 * Decimal("0.25") / M + 100 * Decimal(1) / M  # 0.00055
    batched_1 = Decimal("0.5") * batch_1 + Decimal("0.5") * routed_1  # --non-urgent-share 0.5 (default)
    # call 2 (light): 2000 input, 500 output
    actual_2 = 2000 * Decimal(10) / M + 500 * Decimal(30) / M  # 0.035
    routed_2 = 2000 * Decimal(1) / M + 500 * Decimal(2) / M  # 0.003
    batched_2 = Decimal("0.5") * (2000 * Decimal("0.5") / M + 500 * Decimal(1) / M) + Decimal("0.5") * routed_2
    # call 4 (complex): unchanged by routing and never batched; reasoning tokens are inside the output tokens
    actual_4 = 500 * Decimal(10) / M + 1000 * Decimal(30) / M  # 0.035
    # call 9 (light, already on lite-1)
    actual_9 = 100 * Decimal(1) / M + 10 * Decimal(2) / M  # 0.00012
    batched_9 = Decimal("0.5") * (100 * Decimal("0.5") / M + 10 * Decimal(1) / M) + Decimal("0.5") * actual_9
    # call 10 (explicit complex)
    actual_10 = 1000 * Decimal(10) / M  # 0.01

    actual = actual_1 + actual_2 + actual_4 + actual_9 + actual_10
    routed = routed_1 + routed_2 + actual_4 + actual_9 + actual_10
    batched = batched_1 + batched_2 + actual_4 + batched_9 + actual_10
    assert actual == Decimal("0.09212") and batched == Decimal("0.048165")  # the hand figures, written out
    totals = report["totals"]
    assert Decimal(totals["actual_cost_usd"]) == actual
    assert Decimal(totals["routed_cost_usd"]) == routed
    assert Decimal(totals["batched_cost_usd"]) == batched
    assert Decimal(totals["routed_savings_usd"]) == actual - routed
    assert Decimal(totals["batched_savings_usd"]) == actual - batched == Decimal("0.043955")
    # the log covers T0 .. T0 + 2 days: a 30-day month is 15 times that
    assert report["span"]["days"] == "2" and report["span"]["source"] == "log"
    assert Decimal(totals["monthly_batched_savings_usd"]) == (actual - batched) * 15 == Decimal("0.659325")
    assert Decimal(totals["monthly_routed_savings_usd"]) == (actual - routed) * 15
    assert Decimal(totals["monthly_actual_cost_usd"]) == actual * 15
    assert totals["savings_pct"] == float(((actual - batched) * 100 / actual).quantize(Decimal("0.01")))

    assert totals["calls"] == 5 and totals["light_calls"] == 3 and totals["complex_calls"] == 2
    assert totals["input_tokens"] == 1000 + 2000 + 500 + 100 + 1000
    assert totals["cached_tokens"] == 200 and totals["reasoning_tokens"] == 400
    classification = row(report, "classification")
    assert (classification["calls"], classification["light_calls"], classification["complex_calls"]) == (3, 2, 1)
    assert Decimal(classification["batched_savings_usd"]) == (actual_1 - batched_1) + (actual_2 - batched_2)
    general = row(report, "general")
    assert (general["calls"], general["light_calls"], general["complex_calls"]) == (2, 1, 1)
    assert Decimal(general["actual_cost_usd"]) == actual_4 + actual_9
    assert report["unpriced_models"] == {} and totals["unpriced_calls"] == 0
    assert report["mode"] == "log" and report["lines_read"] == 9


def test_share_and_days_flags(tmp_path: Path, config_file: Path) -> None:
    log = write_log(tmp_path)
    report = run_json(str(log), "--config", str(config_file), "--non-urgent-share", "1", "--days", "3")
    # every light call at lite-1's batch price
    batch_1 = 800 * Decimal("0.5") / M + 200 * Decimal("0.25") / M + 100 * Decimal(1) / M
    batch_2 = 2000 * Decimal("0.5") / M + 500 * Decimal(1) / M
    batch_9 = 100 * Decimal("0.5") / M + 10 * Decimal(1) / M
    complex_calls = (500 * Decimal(10) / M + 1000 * Decimal(30) / M) + 1000 * Decimal(10) / M
    assert Decimal(report["totals"]["batched_cost_usd"]) == batch_1 + batch_2 + batch_9 + complex_calls
    assert report["non_urgent_share"] == "1"
    savings = Decimal("0.09212") - (batch_1 + batch_2 + batch_9 + complex_calls)
    assert report["span"] == {**report["span"], "days": "3", "source": "--days"}
    assert Decimal(report["totals"]["monthly_batched_savings_usd"]) == savings * 10  # 30 days / 3 days

    none_batched = run_json(str(log), "--config", str(config_file), "--non-urgent-share", "0")
    assert none_batched["totals"]["batched_cost_usd"] == none_batched["totals"]["routed_cost_usd"]


def test_malformed_lines_are_reported_with_their_numbers_and_the_rest_counted(tmp_path: Path,
                                                                               config_file: Path) -> None:
    log = write_log(tmp_path)
    report = run_json(str(log), "--config", str(config_file))
    assert report["skipped_count"] == 4
    assert report["skipped"][0]["reason"].startswith("invalid JSON (")  # the parser's words follow
    assert [(s["line"], s["reason"].split(" (")[0] if s["line"] == 3 else s["reason"])
            for s in report["skipped"]] == [
        (3, "invalid JSON"),
        (5, "no 'response' object"),
        (7, "response.usage has no completion_tokens"),
        (8, "not a JSON object"),
    ]
    assert report["calls"] == 5

    table = run(str(log), "--config", str(config_file))
    assert table.exit_code == 0, table.output
    assert "skipped lines: 4" in table.stdout
    assert "line 3: invalid JSON" in table.stdout and "line 8: not a JSON object" in table.stdout


def test_many_bad_lines_are_capped_in_the_table_and_all_listed_in_json(tmp_path: Path, config_file: Path) -> None:
    good = log_line(body("hi", task_type="classification"), completion("big-1", 10, 10, T0))
    path = tmp_path / "noisy.jsonl"
    path.write_text("\n".join(["oops"] * 25 + [good]) + "\n")
    table = run(str(path), "--config", str(config_file))
    assert table.exit_code == 0, table.output
    assert "line 20: invalid JSON" in table.stdout and "line 21:" not in table.stdout
    assert "… and 5 more" in table.stdout
    report = run_json(str(path), "--config", str(config_file))
    assert [s["line"] for s in report["skipped"]] == list(range(1, 26))
    assert report["calls"] == 1
    # a single `created`: the span is unknown and nothing is extrapolated
    assert report["span"]["days"] is None and report["totals"]["monthly_batched_savings_usd"] is None
    assert any("give --days" in note for note in report["notes"])


def test_table_output_smoke(tmp_path: Path, config_file: Path) -> None:
    result = run(str(write_log(tmp_path)), "--config", str(config_file))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("task type", "classification", "general", "total", "saved $/month", "0.09212", "0.043955",
                 "0.659325", "lite-1"):
        assert text in out, text
    assert "Traceback" not in result.output


def test_unreadable_or_empty_input_is_a_clear_error(tmp_path: Path, config_file: Path) -> None:
    missing = run(str(tmp_path / "nope.jsonl"), "--config", str(config_file))
    assert missing.exit_code == 2
    assert "no such file" in missing.stderr and "Traceback" not in missing.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n\n{\"request\": {}}\n")
    result = run(str(bad), "--config", str(config_file), "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "no call could be read" in result.stderr and "line 1: invalid JSON" in result.stderr
    assert "line 3: no 'response' object" in result.stderr

    assert run(str(bad), "--config", str(tmp_path / "missing.toml")).exit_code == 2
    assert run(str(write_log(tmp_path)), "--config", str(config_file), "--days", "0").exit_code == 2


def test_unpriced_models_are_counted_never_zero(tmp_path: Path, config_file: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join([
        log_line(body("hi", model="mystery-model", task_type="classification"),
                 completion("mystery-model-v2", 1000, 1000, T0)),
        log_line(body("hi", task_type="classification"), completion("big-1", 1000, 0, T0 + DAY)),
    ]) + "\n")
    report = run_json(str(path), "--config", str(config_file))
    totals = report["totals"]
    assert totals["calls"] == 2 and totals["unpriced_calls"] == 1
    assert report["unpriced_models"] == {"mystery-model-v2": 1}
    assert Decimal(totals["actual_cost_usd"]) == 1000 * Decimal(10) / M  # only the priced call
    assert Decimal(totals["routed_cost_usd"]) == 1000 * Decimal(1) / M


def write_batch_pair(tmp_path: Path) -> tuple[Path, Path]:
    def input_line(custom_id: str, request: dict[str, Any]) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": request})

    def output_line(custom_id: str, status: int, response_body: dict[str, Any] | None,
                    error: dict[str, Any] | None = None) -> str:
        return json.dumps({"id": f"batch_req_{custom_id}", "custom_id": custom_id,
                           "response": {"status_code": status, "request_id": "r", "body": response_body},
                           "error": error})

    input_path = tmp_path / "batch_input.jsonl"
    input_path.write_text("\n".join([
        input_line("a", body("Label: fine", task_type="classification")),  # light
        input_line("b", body("Label: bad", task_type="classification")),  # fails in the output
        input_line("c", body("Is 17 prime?", task_type="reasoning")),  # complex by [routing]
        "{broken",
        input_line("d", body("Label: lost", task_type="classification")),  # no output line
        input_line("a", body("duplicate", task_type="classification")),
    ]) + "\n")
    output_path = tmp_path / "batch_output.jsonl"
    output_path.write_text("\n".join([  # not in input order
        output_line("c", 200, completion("big-1", 2000, 1000, T0)),
        output_line("zzz", 200, completion("big-1", 1, 1, T0)),
        output_line("b", 400, {"error": {"message": "bad request"}}),
        output_line("a", 200, completion("big-1", 1000, 100, T0)),
    ]) + "\n")
    return input_path, output_path


def test_batch_api_pair_is_joined_by_custom_id_at_batch_prices(tmp_path: Path, config_file: Path) -> None:
    input_path, output_path = write_batch_pair(tmp_path)
    report = run_json(str(input_path), "--output", str(output_path), "--config", str(config_file))
    assert report["mode"] == "batch" and report["calls"] == 2
    # already batched: actual at big-1's batch price ($5 / $15), a light call re-priced at lite-1's batch price
    actual_a = 1000 * Decimal(5) / M + 100 * Decimal(15) / M  # 0.0065
    routed_a = 1000 * Decimal("0.5") / M + 100 * Decimal(1) / M  # 0.0006
    actual_c = 2000 * Decimal(5) / M + 1000 * Decimal(15) / M  # 0.025, complex: unchanged
    totals = report["totals"]
    assert Decimal(totals["actual_cost_usd"]) == actual_a + actual_c
    assert Decimal(totals["routed_cost_usd"]) == routed_a + actual_c
    assert Decimal(totals["batched_cost_usd"]) == routed_a + actual_c
    assert Decimal(totals["batched_savings_usd"]) == actual_a - routed_a == Decimal("0.0059")
    assert row(report, "classification")["light_calls"] == 1 and row(report, "reasoning")["complex_calls"] == 1
    assert report["non_urgent_share"] == "1"
    assert report["skipped"][0]["reason"].startswith("invalid JSON (")  # the parser's words follow
    assert [(s["file"], s["line"], s["reason"].split(" (")[0] if s["line"] == 4 else s["reason"])
            for s in report["skipped"]] == [
        ("input", 4, "invalid JSON"),
        ("input", 5, "no output line for custom_id 'd'"),
        ("input", 6, "duplicate custom_id 'a' (first on line 1)"),
        ("output", 2, "custom_id 'zzz' is not a usable line of the input file"),
        ("output", 3, "request failed (status 400): not billed"),
    ]
    # every response has the same `created`: monthly figures need --days
    assert totals["monthly_batched_savings_usd"] is None
    with_days = run_json(str(input_path), "--output", str(output_path), "--config", str(config_file),
                         "--days", "3")
    assert Decimal(with_days["totals"]["monthly_batched_savings_usd"]) == Decimal("0.0059") * 10

    table = run(str(input_path), "--output", str(output_path), "--config", str(config_file))
    assert table.exit_code == 0 and "output line 3: request failed (status 400)" in table.stdout


def test_tier_classification() -> None:
    config = parse_config(default_config_data(), environ={})
    auditor = Auditor(config, AuditOptions(), batch_mode=False)
    reasoning = body("Think step by step and derive the closed form of this recurrence")
    assert auditor.classify(reasoning, "request") == ("general", Tier.COMPLEX)
    assert auditor.classify(body("Translate 'cat' to French"), "request") == ("general", Tier.LIGHT)
    tools = body("Look up the weather", tools=[{"type": "function", "function": {"name": "weather"}}])
    assert auditor.classify(tools, "request") == ("general", Tier.COMPLEX)
    assert auditor.classify(body("Why?", task_type="reasoning"), "request") == ("reasoning", Tier.COMPLEX)
    assert auditor.classify(body("Prove it", task_type="classification"), "request") == ("classification",
                                                                                         Tier.LIGHT)
    assert auditor.classify(body("Prove it", tier="light"), "request") == ("general", Tier.LIGHT)
    assert auditor.classify({"messages": []}, "request") == "request has no messages"


def test_real_genai_prices_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the embedded default config: gpt-4o served as a dated snapshot, light = gpt-4o-mini."""
    monkeypatch.delenv("TIERBATCH_CONFIG", raising=False)
    path = tmp_path / "calls.jsonl"
    path.write_text(log_line(body("Label this: fine", model="gpt-4o", task_type="classification"),
                             completion("gpt-4o-2024-08-06", 3000, 400, T0, cached=1280)) + "\n")
    report = run_json(str(path))
    book = PriceBook(parse_config(default_config_data(), environ={}))
    served = book.unit_prices("sim", "gpt-4o-2024-08-06")
    light = book.unit_prices("sim", "gpt-4o-mini")
    light_batch = book.unit_prices("sim", "gpt-4o-mini", batch=True)
    assert served is not None and light is not None and light_batch is not None

    def cost(prices: Any) -> Decimal:
        total: Decimal = (1720 * prices.input + 1280 * prices.cached_input + 400 * prices.output) / M
        return total

    totals = report["totals"]
    assert Decimal(totals["actual_cost_usd"]) == cost(served)
    assert Decimal(totals["routed_cost_usd"]) == cost(light)
    assert Decimal(totals["batched_cost_usd"]) == Decimal("0.5") * cost(light_batch) + Decimal("0.5") * cost(light)
    assert Decimal(totals["actual_cost_usd"]) == Decimal("0.0099")  # README: 1,720×2.50 + 1,280×1.25 + 400×10
    assert report["light_model"] == {"provider": "sim", "model": "gpt-4o-mini"}
