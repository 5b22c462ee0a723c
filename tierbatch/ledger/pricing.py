"""Prices per token kind: genai-prices offline, overridden by config `[prices]`.

Unit prices are USD per million tokens and are stored on each ledger row, so history never
changes when prices do. A model without any known price is *unpriced*: cost None, never 0.
Cached input tokens are a subset of input tokens and are billed once, at the cached rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice

from tierbatch.base.config import AppConfig, PriceOverride

MILLION = Decimal(1_000_000)
_BATCH_CONTEXT = {"processing": "batch"}


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one response, normalised over provider kinds. `input_tokens` is the whole prompt;
    `cached_tokens` (read from the provider's prompt cache) and `cache_write_tokens` (written to it,
    Anthropic's `cache_creation_input_tokens`) are parts of it; `reasoning_tokens` are part of
    `output_tokens`."""

    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """USD per million tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    def cost(self, usage: TokenUsage) -> PricedUsage:
        uncached = usage.input_tokens - usage.cached_tokens
        input_cost = self.input * uncached / MILLION
        cached_cost = self.cached_input * usage.cached_tokens / MILLION
        # reasoning tokens are part of the output tokens (OpenAI's accounting): not billed again
        output_cost = self.output * usage.output_tokens / MILLION
        return PricedUsage(self, input_cost, cached_cost, output_cost, input_cost + cached_cost + output_cost)


@dataclass(frozen=True, slots=True)
class PricedUsage:
    prices: UnitPrices
    input_cost: Decimal
    cached_input_cost: Decimal
    output_cost: Decimal
    total: Decimal


def _per_million(value: object) -> Decimal | None:
    return value if isinstance(value, Decimal) else None


def _from_genai(model: str, provider_id: str | None, batch: bool) -> UnitPrices | None:
    try:
        result = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider_id,
                            price_context=_BATCH_CONTEXT if batch else None)
    except LookupError:
        return None
    model_price: ModelPrice = result.model_price
    input_price = _per_million(getattr(model_price, "input_mtok", None))
    output_price = _per_million(getattr(model_price, "output_mtok", None))
    if input_price is None or output_price is None:
        return None  # tiered or missing prices: do not guess
    cached = _per_million(getattr(model_price, "cache_read_mtok", None))
    return UnitPrices(input=input_price, cached_input=cached if cached is not None else input_price,
                      output=output_price)


def _from_override(override: PriceOverride, batch: bool) -> UnitPrices:
    factor = (Decimal(1) - override.batch_discount) if batch else Decimal(1)
    cached = override.cached_input if override.cached_input is not None else override.input
    return UnitPrices(input=override.input * factor, cached_input=cached * factor,
                      output=override.output * factor)


class PriceBook:
    """Looks up unit prices for (provider, model); config overrides win over genai-prices."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._memo: dict[tuple[str, str, bool], UnitPrices | None] = {}

    def unit_prices(self, provider: str, model: str, *, batch: bool = False) -> UnitPrices | None:
        key = (provider, model, batch)
        if key not in self._memo:
            self._memo[key] = self._lookup(provider, model, batch)
        return self._memo[key]

    def _lookup(self, provider: str, model: str, batch: bool) -> UnitPrices | None:
        override = self._config.prices.get(model)
        if override is not None:
            return _from_override(override, batch)
        provider_config = self._config.providers.get(provider)
        prices_from = provider_config.prices_from if provider_config else None
        if prices_from is None:
            return None
        return _from_genai(model, prices_from, batch)

    def price(self, provider: str, served_model: str, requested_model: str, usage: TokenUsage, *,
              batch: bool = False) -> PricedUsage | None:
        """Price by the served model first, then by the requested one."""
        for model in (served_model, requested_model):
            prices = self.unit_prices(provider, model, batch=batch)
            if prices is not None:
                return prices.cost(usage)
        return None

    def baseline(self, usage: TokenUsage) -> Decimal | None:
        """The same tokens at the complex tier's model, immediate price."""
        complex_tier = self._config.tiers["complex"]
        prices = self.unit_prices(complex_tier.provider, complex_tier.model, batch=False)
        return prices.cost(usage).total if prices is not None else None
