"""Prices per token kind: genai-prices offline, overridden by config `[prices]`.

Unit prices are USD per million tokens and are stored on each ledger row, so history never
changes when prices do. A model without any known price is *unpriced*: cost None, never 0.
Cached input tokens (cache reads) and cache writes are parts of the input tokens, each billed once at
its own rate; the rest of the input at the input rate.

A batch line takes the price table's batch price when the table has one of its own (one that differs
from its standard price); else, when the provider config has `batch_discount`, the standard price less
that discount, and the prices say which discount was applied; else the table's price as it is. Config
`[prices]` overrides apply their own `batch_discount` to every batch line of their model.
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
    """USD per million tokens. `batch_discount`: the provider's batch discount these prices were derived
    with from the table's standard price (a model with no batch price of its own), None otherwise."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    batch_discount: Decimal | None = None

    def cost(self, usage: TokenUsage) -> PricedUsage:
        uncached = usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens
        input_cost = self.input * uncached / MILLION
        cached_cost = self.cached_input * usage.cached_tokens / MILLION
        cache_write_cost = self.cache_write * usage.cache_write_tokens / MILLION
        # reasoning tokens are part of the output tokens (OpenAI's accounting): not billed again
        output_cost = self.output * usage.output_tokens / MILLION
        return PricedUsage(self, input_cost, cached_cost, cache_write_cost, output_cost,
                           input_cost + cached_cost + cache_write_cost + output_cost)

    def discounted(self, discount: Decimal) -> UnitPrices:
        """Every price less `discount` (0.5: half), marked with it."""
        factor = Decimal(1) - discount
        return UnitPrices(input=self.input * factor, cached_input=self.cached_input * factor,
                          cache_write=self.cache_write * factor, output=self.output * factor,
                          batch_discount=discount)


@dataclass(frozen=True, slots=True)
class PricedUsage:
    prices: UnitPrices
    input_cost: Decimal
    cached_input_cost: Decimal
    cache_write_cost: Decimal
    output_cost: Decimal
    total: Decimal


def _per_million(value: object) -> Decimal | None:
    return value if isinstance(value, Decimal) else None


def _table_price(model: str, provider_id: str, context: dict[str, str] | None) -> ModelPrice | None:
    try:
        result = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider_id,
                            price_context=context)
    except LookupError:
        return None
    model_price: ModelPrice = result.model_price
    return model_price


def _unit_prices(model_price: ModelPrice) -> UnitPrices | None:
    input_price = _per_million(getattr(model_price, "input_mtok", None))
    output_price = _per_million(getattr(model_price, "output_mtok", None))
    if input_price is None or output_price is None:
        return None  # tiered or missing prices: do not guess
    cached = _per_million(getattr(model_price, "cache_read_mtok", None))
    cache_write = _per_million(getattr(model_price, "cache_write_mtok", None))
    return UnitPrices(input=input_price, cached_input=cached if cached is not None else input_price,
                      cache_write=cache_write if cache_write is not None else input_price, output=output_price)


def _from_genai(model: str, provider_id: str, batch: bool, batch_discount: Decimal | None) -> UnitPrices | None:
    standard = _table_price(model, provider_id, None)
    if standard is None:
        return None
    if not batch:
        return _unit_prices(standard)
    # the table has a batch price of its own when the batch context changes the model's price; where it
    # does not (it lists none), the batch price it answers is the standard one
    batch_price = _table_price(model, provider_id, _BATCH_CONTEXT)
    if batch_price is not None and batch_price != standard:
        return _unit_prices(batch_price)
    prices = _unit_prices(standard)
    if prices is None or batch_discount is None:
        return prices
    return prices.discounted(batch_discount)


def _from_override(override: PriceOverride, batch: bool) -> UnitPrices:
    factor = (Decimal(1) - override.batch_discount) if batch else Decimal(1)
    cached = override.cached_input if override.cached_input is not None else override.input
    cache_write = override.cache_write if override.cache_write is not None else override.input
    return UnitPrices(input=override.input * factor, cached_input=cached * factor,
                      cache_write=cache_write * factor, output=override.output * factor)


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
        if provider_config is None or provider_config.prices_from is None:
            return None
        return _from_genai(model, provider_config.prices_from, batch, provider_config.batch_discount)

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
