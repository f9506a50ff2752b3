"""Prices per model and tier, and what a response cost by its `usage`.

A price table is either given (`{"model": {"flex": TierPrice(...), ...}}`) or read from
flexserve's `GET /v1/flex/quote`, once per model: the quote's `max_cost_usd` for a
request of 1M prompt tokens and no output is the input price per 1M tokens, and for no
prompt and 1M output tokens the output price. A server without that endpoint (OpenAI
itself) has no table, and costs are then None rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openai.types import CompletionUsage

MILLION = 1_000_000
NANOS_PER_MICRO = 1000
NANOS_PER_USD = 1_000_000_000


@dataclass(frozen=True)
class TierPrice:
    """USD per 1M tokens in one tier."""

    input: float
    output: float
    cached_input: float | None = None
    """Prompt tokens served from a prompt cache; None: the same as `input`."""


ModelPrices = Mapping[str, TierPrice]
"""One model's prices, by tier."""
PriceTable = Mapping[str, ModelPrices]
"""Prices by model, then tier."""


def cost_usd(
    usage: CompletionUsage | None, prices: ModelPrices | None, tier: str | None
) -> float | None:
    """What a response cost in USD (prices are per 1M tokens, so per token they are
    micro-dollars), or None when the usage, the tier or its price is unknown."""
    if usage is None or prices is None or tier is None or tier not in prices:
        return None
    price = prices[tier]
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    cached_price = price.input if price.cached_input is None else price.cached_input
    micros = (usage.prompt_tokens - cached) * price.input + cached * cached_price
    micros += usage.completion_tokens * price.output
    # Whole nano-dollars, as flexserve's ledger bills: the same tokens give the same float.
    return round(micros * NANOS_PER_MICRO) / NANOS_PER_USD


INPUT_QUOTE = {"prompt_tokens": MILLION, "max_tokens": 0}
OUTPUT_QUOTE = {"prompt_tokens": 0, "max_tokens": MILLION}
QUOTE_PATH = "/flex/quote"


def quote_params(model: str, size: Mapping[str, int]) -> dict[str, object]:
    return {"model": model, **size}


def prices_from_quotes(input_quote: object, output_quote: object) -> dict[str, TierPrice] | None:
    """A model's prices from the two quotes, or None if they are not flexserve quotes."""
    inputs, outputs = _tier_costs(input_quote), _tier_costs(output_quote)
    if not inputs or inputs.keys() != outputs.keys():
        return None
    return {tier: TierPrice(input=inputs[tier], output=outputs[tier]) for tier in inputs}


def _tier_costs(quote: object) -> dict[str, float]:
    if not isinstance(quote, dict) or quote.get("object") != "flex.quote":
        return {}
    tiers: Any = quote.get("tiers")
    if not isinstance(tiers, dict):
        return {}
    costs = {tier: entry.get("max_cost_usd") for tier, entry in tiers.items()}
    return {tier: float(cost) for tier, cost in costs.items() if isinstance(cost, int | float)}


class PriceBook:
    """The given table, or what the server's quotes said, asked once per model."""

    def __init__(self, table: PriceTable | None) -> None:
        self.fetches = table is None
        """Whether prices come from the server (no table given)."""
        self._known: dict[str, ModelPrices | None] = dict(table or {})

    def knows(self, model: str) -> bool:
        return not self.fetches or model in self._known

    def get(self, model: str) -> ModelPrices | None:
        return self._known.get(model)

    def learn(self, model: str, prices: ModelPrices | None) -> None:
        self._known[model] = prices
