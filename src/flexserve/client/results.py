"""What the flex clients hand back: the answer, the tier that served it, its cost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias

import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from flexserve.client.policy import Trail
from flexserve.client.prices import ModelPrices, cost_usd

Traceback: TypeAlias = TracebackType | None


@dataclass(frozen=True)
class FlexResult:
    """One answer and how it was obtained."""

    completion: ChatCompletion
    tier: str | None
    """The tier that served it, as the response says (`service_tier`); None if it does not."""
    attempts: int
    """Requests sent: flex attempts, plus the fallback if there was one."""
    fell_back: bool
    """Whether flex was given up and the answer came from the default tier."""
    waited_seconds: float
    """Time slept between attempts on the servers' Retry-After (or backoff)."""
    cost_usd: float | None
    """`usage` at the tier's price; None without a price table (e.g. OpenAI itself)."""


class _StreamTally:
    """What a stream has told so far: its tier and, at the end, its usage."""

    def __init__(self, trail: Trail, prices: ModelPrices | None) -> None:
        self.attempts = trail.attempts
        self.fell_back = trail.fell_back
        self.waited_seconds = trail.waited_seconds
        self.tier: str | None = None
        """The tier the chunks report (None until the first chunk, or if they do not)."""
        self.usage: CompletionUsage | None = None
        """The final usage chunk's usage (None until it arrives)."""
        self._prices = prices

    @property
    def cost_usd(self) -> float | None:
        """Known once the stream has sent its usage (it is asked for unless the caller
        set `stream_options` without it)."""
        return cost_usd(self.usage, self._prices, self.tier)

    def _note(self, chunk: ChatCompletionChunk) -> None:
        if chunk.service_tier is not None:
            self.tier = chunk.service_tier
        if chunk.usage is not None:
            self.usage = chunk.usage


class FlexStream(_StreamTally):
    """A started stream (flex, or its fallback), iterated like the SDK's own."""

    def __init__(
        self, stream: openai.Stream[ChatCompletionChunk], trail: Trail, prices: ModelPrices | None
    ) -> None:
        super().__init__(trail, prices)
        self._stream = stream

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        for chunk in self._stream:
            self._note(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> FlexStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFlexStream(_StreamTally):
    """The async twin of `FlexStream`."""

    def __init__(
        self,
        stream: openai.AsyncStream[ChatCompletionChunk],
        trail: Trail,
        prices: ModelPrices | None,
    ) -> None:
        super().__init__(trail, prices)
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self._stream:
            self._note(chunk)
            yield chunk

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> AsyncFlexStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def result(completion: ChatCompletion, trail: Trail, prices: ModelPrices | None) -> FlexResult:
    tier = completion.service_tier
    return FlexResult(
        completion=completion,
        tier=tier,
        attempts=trail.attempts,
        fell_back=trail.fell_back,
        waited_seconds=trail.waited_seconds,
        cost_usd=cost_usd(completion.usage, prices, tier),
    )
