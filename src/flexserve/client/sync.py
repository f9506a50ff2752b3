"""`FlexClient`: the flex policy over a synchronous `openai.OpenAI`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from flexserve.client import policy as rules
from flexserve.client.policy import FlexPolicy, Trail
from flexserve.client.prices import (
    INPUT_QUOTE,
    OUTPUT_QUOTE,
    QUOTE_PATH,
    ModelPrices,
    PriceBook,
    PriceTable,
    prices_from_quotes,
    quote_params,
)
from flexserve.client.results import FlexResult, FlexStream, result


class FlexClient:
    """Chat completions at the flex tier, under a `FlexPolicy` (see `flexserve.client`).

    `sleep` and `clock` (monotonic seconds) and `wall_clock` (epoch seconds, for a
    Retry-After given as a date) are injectable so that tests need not wait.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        policy: FlexPolicy | None = None,
        prices: PriceTable | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or FlexPolicy()
        self._client = client
        # No SDK retries on flex attempts: a refusal's Retry-After is this policy's to honour.
        self._flex = client.with_options(max_retries=0, timeout=self.policy.timeout)
        self._prices = PriceBook(prices)
        self._sleep, self._clock, self._wall_clock = sleep, clock, wall_clock

    def chat(self, **create: Any) -> FlexResult:
        """`chat.completions.create(**create)` at flex, then by the policy; not a stream."""
        rules.check_request(create)
        prices = self._prices_of(create)
        completion, trail = self._send(create)
        return result(cast(ChatCompletion, completion), trail, prices)

    def stream(self, **create: Any) -> FlexStream:
        """The same as a stream. A stream refused before its first byte is a 429 too, and
        follows the same policy; once started, it is the SDK's stream."""
        rules.check_request(create)
        prices = self._prices_of(create)  # first, so no started stream waits on it
        stream, trail = self._send(rules.stream_kwargs(create))
        chunks = cast(openai.Stream[ChatCompletionChunk], stream)
        return FlexStream(chunks, trail, prices)

    def _send(self, create: dict[str, Any]) -> tuple[object, Trail]:
        trail = Trail(self.policy, started=self._clock())
        while True:
            trail.attempts += 1
            try:
                return self._flex.chat.completions.create(
                    **rules.flex_kwargs(create, self.policy)
                ), trail
            except openai.RateLimitError as error:
                refusal = rules.as_refusal(error, self._wall_clock())
                if refusal is None:
                    raise
                delay = trail.delay_after(refusal, self._clock())
                if delay is None:
                    unavailable = trail.give_up(refusal)
                    if unavailable is not None:
                        raise unavailable from error
                    break
            self._sleep(delay)
            trail.slept(delay)
        trail.attempts += 1
        return self._client.chat.completions.create(**rules.default_kwargs(create)), trail

    def _prices_of(self, create: dict[str, Any]) -> ModelPrices | None:
        model = str(create.get("model"))
        if not self._prices.knows(model):
            self._fetch_prices(model)
        return self._prices.get(model)

    def _fetch_prices(self, model: str) -> None:
        try:
            quotes = [
                self._client.get(
                    QUOTE_PATH, cast_to=object, options={"params": quote_params(model, size)}
                )
                for size in (INPUT_QUOTE, OUTPUT_QUOTE)
            ]
        except openai.APIStatusError as error:
            if error.status_code < 500:  # no such endpoint (OpenAI itself): never ask again
                self._prices.learn(model, None)
            return
        except openai.APIConnectionError:
            return  # the answer stands without its cost; ask again next time
        self._prices.learn(model, prices_from_quotes(*quotes))
