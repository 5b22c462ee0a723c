from __future__ import annotations

from decimal import Decimal

from genai_prices import Usage, calc_price

from tierbatch.base.config import default_config_data, parse_config
from tierbatch.ledger.pricing import PriceBook, TokenUsage


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
