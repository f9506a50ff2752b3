"""Prices: USD per 1M tokens in config, integer nano-dollars in the ledger.

USD per 1M tokens is numerically micro-dollars per token, so a request on a small model
costs a few micro-dollars; nano-dollars keep that exact instead of rounding to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexserve.config import Settings, TierPrice
from flexserve.scheduling.tiers import Tier

NANOS_PER_MICRO = 1000


@dataclass(frozen=True)
class Cost:
    nanos: int
    list_nanos: int
    """The same tokens at the default tier."""


def token_cost(price: TierPrice, input_tokens: int, cached: int, output: int) -> int:
    micros = (input_tokens - cached) * price.input + cached * price.cached_input
    micros += output * price.output
    return round(micros * NANOS_PER_MICRO)


def request_cost(
    settings: Settings, model: str, tier: Tier, input_tokens: int, cached: int, output: int
) -> Cost:
    return priced(tier_prices(settings, model, tier), input_tokens, cached, output)


def tier_prices(settings: Settings, model: str, tier: Tier) -> tuple[TierPrice, TierPrice]:
    """The model's price in `tier`, and its list price (the default tier's)."""
    table = settings.price(model)
    return table.for_tier(tier), table.for_tier("default")


def priced(
    prices: tuple[TierPrice, TierPrice], input_tokens: int, cached: int, output: int
) -> Cost:
    price, list_price = prices
    return Cost(
        nanos=token_cost(price, input_tokens, cached, output),
        list_nanos=token_cost(list_price, input_tokens, cached, output),
    )


class PriceCache:
    """`request_cost` for one settings, with each (model, tier) price worked out once:
    the ledger prices every request, and building the price objects anew each time was
    a measurable share of a short request's CPU."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._prices: dict[tuple[str, Tier], tuple[TierPrice, TierPrice]] = {}

    def cost(self, model: str, tier: Tier, input_tokens: int, cached: int, output: int) -> Cost:
        prices = self._prices.get((model, tier))
        if prices is None:
            prices = self._prices[(model, tier)] = tier_prices(self.settings, model, tier)
        return priced(prices, input_tokens, cached, output)


def usd(nanos: int) -> float:
    return nanos / 1e9
