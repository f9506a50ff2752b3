"""`AsyncFlexClient`: the flex policy over `openai.AsyncOpenAI` (the twin of `sync.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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
from flexserve.client.results import AsyncFlexStream, FlexResult, result


class AsyncFlexClient:
    """Chat completions at the flex tier, under a `FlexPolicy` (see `flexserve.client`).

    `sleep` and `clock` (monotonic seconds) and `wall_clock` (epoch seconds, for a
    Retry-After given as a date) are injectable so that tests need not wait.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        policy: FlexPolicy | None = None,
        prices: PriceTable | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or FlexPolicy()
        self._client = client
        # No SDK retries on flex attempts: a refusal's Retry-After is this policy's to honour.
        self._flex = client.with_options(max_retries=0, timeout=self.policy.timeout)
        self._prices = PriceBook(prices)
        self._sleep, self._clock, self._wall_clock = sleep, clock, wall_clock

    async def chat(self, **create: Any) -> FlexResult:
        """`chat.completions.create(**create)` at flex, then by the policy; not a stream."""
        rules.check_request(create)
        prices = await self._prices_of(create)
        completion, trail = await self._send(create)
        return result(cast(ChatCompletion, completion), trail, prices)

    async def stream(self, **create: Any) -> AsyncFlexStream:
        """The same as a stream. A stream refused before its first byte is a 429 too, and
        follows the same policy; once started, it is the SDK's stream."""
        rules.check_request(create)
        prices = await self._prices_of(create)  # first, so no started stream waits on it
        stream, trail = await self._send(rules.stream_kwargs(create))
        chunks = cast(openai.AsyncStream[ChatCompletionChunk], stream)
        return AsyncFlexStream(chunks, trail, prices)

    async def _send(self, create: dict[str, Any]) -> tuple[object, Trail]:
        trail = Trail(self.policy, started=self._clock())
        while True:
            trail.attempts += 1
            try:
                return await self._flex.chat.completions.create(
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
            await self._sleep(delay)
            trail.slept(delay)
        trail.attempts += 1
        return await self._client.chat.completions.create(**rules.default_kwargs(create)), trail

    async def _prices_of(self, create: dict[str, Any]) -> ModelPrices | None:
        model = str(create.get("model"))
        if not self._prices.knows(model):
            await self._fetch_prices(model)
        return self._prices.get(model)

    async def _fetch_prices(self, model: str) -> None:
        try:
            quotes = [
                await self._client.get(
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
