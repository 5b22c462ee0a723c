from __future__ import annotations

from decimal import Decimal

from genai_prices import Usage, calc_price

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.db.bulk_sql import LEDGER_USAGE_COLUMNS
from tierbatch.ledger.pricing import PriceBook, TokenUsage
from tierbatch.ledger.rows import usage_columns


def price_book(**extra: object) -> PriceBook:
    data = default_config_data()
    data.update(extra)
    return PriceBook(parse_config(data, environ={}))


def test_immediate_price_matches_genai_prices_with_cached_tokens_billed_once() -> None:
    usage = TokenUsage(input_tokens=3000, cached_tokens=1280, output_tokens=400)
    priced = price_book().price("sim", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", usage)
    assert priced is not None
    expected = calc_price(Usage(input_tokens=3000, cache_read_tokens=1280, output_tokens=400),
                          model_ref="gpt-4o-mini-2024-07-18", provider_id="openai").total_price
    assert priced.total == expected
    assert priced.input_cost == priced.prices.input * 1720 / Decimal(1_000_000)


def test_batch_price_is_genai_prices_batch_context() -> None:
    usage = TokenUsage(input_tokens=1000, cached_tokens=0, output_tokens=1000)
    book = price_book()
    immediate = book.price("sim", "gpt-4o-mini", "gpt-4o-mini", usage)
    batch = book.price("sim", "gpt-4o-mini", "gpt-4o-mini", usage, batch=True)
    assert immediate is not None and batch is not None
    assert batch.total == immediate.total / 2


def test_unknown_model_is_unpriced_not_free() -> None:
    usage = TokenUsage(input_tokens=10, cached_tokens=0, output_tokens=10)
    assert price_book().price("sim", "no-such-model-xyz", "no-such-model-xyz", usage) is None


def test_config_override_wins_and_served_model_falls_back_to_requested() -> None:
    book = price_book(prices={"my-local-llama": {"input": 0.05, "output": 0.10, "batch_discount": 0.5}})
    usage = TokenUsage(input_tokens=2_000_000, cached_tokens=0, output_tokens=1_000_000)
    priced = book.price("sim", "my-local-llama-q4-2025", "my-local-llama", usage)
    assert priced is not None
    assert priced.total == Decimal("0.20")
    batch = book.price("sim", "my-local-llama", "my-local-llama", usage, batch=True)
    assert batch is not None and batch.total == Decimal("0.10")


def test_baseline_is_complex_model_immediate_price() -> None:
    usage = TokenUsage(input_tokens=1000, cached_tokens=0, output_tokens=100)
    expected = calc_price(Usage(input_tokens=1000, output_tokens=100), model_ref="gpt-4o",
                          provider_id="openai").total_price
    assert price_book().baseline(usage) == expected


# --- cache writes and batch prices: figures written out from genai-prices 0.2.3's table ------------------
# claude-3-5-haiku: $0.80 input, $0.08 cache read, $1.00 cache write, $4 output per 1M; no batch price of its own
# claude-haiku-4-5: $1 / $0.10 / $1.25 / $5; batch $0.50 / $0.05 / $0.625 / $2.50

ANTHROPIC = {"kind": "anthropic", "base_url": "https://anthropic.invalid", "prices_from": "anthropic"}
# 10,000 input tokens: 2,000 read from the prompt cache, 1,000 written to it, 7,000 billed at the input rate
CACHED_AND_WRITTEN = TokenUsage(input_tokens=10_000, cached_tokens=2_000, output_tokens=1_000,
                                cache_write_tokens=1_000)


def anthropic_book(**provider: object) -> PriceBook:
    data = default_config_data()
    data["providers"] = {**data["providers"], "anthropic": {**ANTHROPIC, **provider}}
    return PriceBook(parse_config(data, environ={}))


def test_cache_writes_are_priced_at_the_tables_cache_write_rate() -> None:
    priced = anthropic_book().price("anthropic", "claude-haiku-4-5", "claude-haiku-4-5", CACHED_AND_WRITTEN)
    assert priced is not None
    assert (priced.prices.input, priced.prices.cached_input, priced.prices.cache_write, priced.prices.output) == (
        Decimal(1), Decimal("0.1"), Decimal("1.25"), Decimal(5))
    assert priced.input_cost == Decimal("0.007")  # 7,000 × $1
    assert priced.cached_input_cost == Decimal("0.0002")  # 2,000 × $0.10
    assert priced.cache_write_cost == Decimal("0.00125")  # 1,000 × $1.25
    assert priced.output_cost == Decimal("0.005")  # 1,000 × $5
    assert priced.total == Decimal("0.01345")
    assert priced.prices.batch_discount is None


def test_batch_line_without_a_table_batch_price_takes_the_providers_discount_and_says_so() -> None:
    book = anthropic_book(batch_discount=0.5)
    standard = book.price("anthropic", "claude-3-5-haiku", "claude-3-5-haiku", CACHED_AND_WRITTEN)
    batch = book.price("anthropic", "claude-3-5-haiku", "claude-3-5-haiku", CACHED_AND_WRITTEN, batch=True)
    assert standard is not None and batch is not None
    # 7,000 × $0.80 + 2,000 × $0.08 + 1,000 × $1 + 1,000 × $4, per 1M
    assert standard.total == Decimal("0.0056") + Decimal("0.00016") + Decimal("0.001") + Decimal("0.004")
    assert standard.prices.batch_discount is None
    assert (batch.prices.input, batch.prices.cached_input, batch.prices.cache_write, batch.prices.output) == (
        Decimal("0.4"), Decimal("0.04"), Decimal("0.5"), Decimal(2))
    assert batch.total == Decimal("0.00538")  # half of 0.01076
    assert batch.prices.batch_discount == Decimal("0.5")


def test_batch_line_with_a_table_batch_price_takes_it_unmarked() -> None:
    batch = anthropic_book(batch_discount=0.5).price("anthropic", "claude-haiku-4-5", "claude-haiku-4-5",
                                                     CACHED_AND_WRITTEN, batch=True)
    assert batch is not None
    assert (batch.prices.input, batch.prices.cached_input, batch.prices.cache_write, batch.prices.output) == (
        Decimal("0.5"), Decimal("0.05"), Decimal("0.625"), Decimal("2.5"))
    # 7,000 × $0.50 + 2,000 × $0.05 + 1,000 × $0.625 + 1,000 × $2.50, per 1M
    assert batch.total == Decimal("0.006725")
    assert batch.prices.batch_discount is None


def test_batch_line_without_any_batch_price_or_discount_is_the_tables_price() -> None:
    batch = anthropic_book().price("anthropic", "claude-3-5-haiku", "claude-3-5-haiku", CACHED_AND_WRITTEN,
                                   batch=True)
    assert batch is not None
    assert batch.total == Decimal("0.01076") and batch.prices.batch_discount is None


def test_openai_batch_price_of_the_table_wins_over_a_configured_discount() -> None:
    data = default_config_data()
    data["providers"]["sim"]["batch_discount"] = 0.25
    book = PriceBook(parse_config(data, environ={}))
    batch = book.price("sim", "gpt-4o-mini", "gpt-4o-mini", TokenUsage(1_000_000, 0, 1_000_000), batch=True)
    assert batch is not None
    assert batch.total == Decimal("0.375")  # $0.075 + $0.30: the table's batch price, not 0.75 × $0.60 + …
    assert batch.prices.batch_discount is None


def test_override_cache_write_price_and_its_own_batch_discount() -> None:
    book = price_book(prices={
        "my-local-llama": {"input": 0.05, "cached_input": 0.025, "cache_write": 0.08, "output": 0.10,
                           "batch_discount": 0.5},
        "plain-llama": {"input": 0.05, "output": 0.10}})
    priced = book.price("sim", "my-local-llama", "my-local-llama", CACHED_AND_WRITTEN)
    assert priced is not None
    assert priced.cache_write_cost == Decimal("0.00008")  # 1,000 × $0.08
    # 7,000 × $0.05 + 2,000 × $0.025 + 1,000 × $0.08 + 1,000 × $0.10, per 1M
    assert priced.total == Decimal("0.00058")
    batch = book.price("sim", "my-local-llama", "my-local-llama", CACHED_AND_WRITTEN, batch=True)
    assert batch is not None and batch.total == Decimal("0.00029") and batch.prices.batch_discount is None
    plain = book.unit_prices("sim", "plain-llama")
    assert plain is not None and plain.cache_write == Decimal("0.05")  # no cache_write key: the input price


def test_usage_columns_are_the_ledger_usage_columns_in_order() -> None:
    priced = anthropic_book(batch_discount=0.5).price("anthropic", "claude-3-5-haiku", "claude-3-5-haiku",
                                                      CACHED_AND_WRITTEN, batch=True)
    values = usage_columns(CACHED_AND_WRITTEN, priced)
    assert tuple(values) == LEDGER_USAGE_COLUMNS
    assert (values["cache_write_tokens"], values["cache_write_price"], values["cache_write_cost_usd"],
            values["batch_discount"]) == (1_000, Decimal("0.5"), Decimal("0.0005"), Decimal("0.5"))
    unpriced = usage_columns(CACHED_AND_WRITTEN, None)
    assert unpriced["cache_write_tokens"] == 1_000
    assert all(unpriced[name] is None for name in LEDGER_USAGE_COLUMNS if not name.endswith("_tokens"))
