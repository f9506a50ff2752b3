"""A performance model of an inference engine, for tests, benchmarks and users' own tests.

Time to first token is `a + b * tokens_to_prefill` (independent of occupancy, so that
benchmarks isolate scheduling); time per output token is `c * (1 + g * (active - 1))`.
The text is deterministic: token i of an answer depends only on the prompt and i, so a
job preempted any number of times produces exactly the text of one never preempted.

An answer ends naturally (finish_reason stop, as at an end-of-sequence token) after
`natural_output_tokens`, or at a stop string; vLLM's `min_tokens` holds both ends back
until that many tokens, and `ignore_eos` removes the natural end (max_tokens cuts it).
`top_k` and `repetition_penalty` are accepted and change nothing: the text does not
come from sampling.

Faults for tests are asked for in the prompt when `fault_markers` is on (off by
default): `[sim:error@N]` fails the stream after N tokens, `[sim:hang@N]` stops
producing after N tokens until cancelled.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

from flexserve.backends.base import (
    BackendError,
    BackendStats,
    ChatMessage,
    Chunk,
    Finish,
    FinishReason,
    GenerationRequest,
    TokenChunk,
)
from flexserve.config import SimulatedSettings

WORDS: Final = tuple(
    [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dogs",
        "while",
        "seven",
        "tired",
        "engineers",
        "measure",
        "queue",
        "latency",
        "under",
        "flex",
        "load",
        "and",
        "every",
        "idle",
        "slot",
        "keeps",
        "working",
        "on",
        "cheap",
        "batch",
        "tokens",
        "until",
        "priority",
        "traffic",
        "arrives",
        "then",
        "pauses",
        "politely",
        "resumes",
        "later",
        "exactly",
    ]
)
_FAULT = re.compile(r"\[sim:(error|hang)@(\d+)\]")
_ERROR_BASE: Final = -1_000_000
_HANG_BASE: Final = -2_000_000
_TOKENS_PER_MESSAGE: Final = 4

Sleep = Callable[[float], Awaitable[None]]


class SimulatedBackend:
    name = "simulated"
    can_pause = True
    estimates_tokens = False  # it splits words: over a large body, not for the event loop
    unsupported_sampling: frozenset[str] = frozenset()  # all of vLLM's are honoured

    def __init__(
        self,
        model: str,
        slots: int,
        settings: SimulatedSettings | None = None,
        *,
        context_length: int = 8192,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.slots = slots
        self.context_length = context_length
        self.settings = settings or SimulatedSettings()
        self._sleep = sleep
        self._clock = clock
        self._stats = BackendStats()
        self._since = clock()

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        tokens: list[int] = []
        for message in messages:
            tokens.extend(_word_id(f"<{message.role}>", k) for k in range(_TOKENS_PER_MESSAGE))
            tokens.extend(_word_id(word, 0) for word in message.content.split())
            if self.settings.fault_markers:
                tokens.extend(_fault_tokens(message.content))
        return tuple(tokens)

    def encode_text(self, text: str) -> tuple[int, ...]:
        tokens = [_word_id(word, 0) for word in text.split()] or [_word_id("<empty>", 0)]
        if self.settings.fault_markers:
            tokens.extend(_fault_tokens(text))
        return tuple(tokens)

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        plan = _Answer(request, self.settings.natural_output_tokens)
        self._set_active(+1)
        try:
            prefill = len(request.prompt_tokens) + len(resume)
            await self._sleep(self._ttft(prefill))
            self._stats.prefilled_tokens += prefill
            for index in range(len(resume), plan.length):
                if index > len(resume):
                    await self._sleep(self._tpot())
                await plan.fault_before(index, self._sleep)
                self._stats.sampled_tokens += 1
                word = plan.word(index)
                if word in request.sampling.stop and index >= request.sampling.min_tokens:
                    yield Finish("stop")
                    return
                yield TokenChunk(token_id=_word_id(word, index), text=_spaced(word, index))
            yield Finish(plan.finish_reason)
        finally:
            self._set_active(-1)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> bool:
        return True

    def stats(self) -> BackendStats:
        self._set_active(0)
        return BackendStats(
            busy_slot_seconds=self._stats.busy_slot_seconds,
            prefilled_tokens=self._stats.prefilled_tokens,
            sampled_tokens=self._stats.sampled_tokens,
            active_sequences=self._stats.active_sequences,
        )

    def _ttft(self, prefill_tokens: int) -> float:
        s = self.settings
        return (s.ttft_ms + s.ttft_per_prompt_token_ms * prefill_tokens) / 1000.0

    def _tpot(self) -> float:
        s = self.settings
        active = max(1, self._stats.active_sequences)
        return s.tpot_ms * (1.0 + s.tpot_growth * (active - 1)) / 1000.0

    def _set_active(self, delta: int) -> None:
        now = self._clock()
        self._stats.busy_slot_seconds += self._stats.active_sequences * (now - self._since)
        self._since = now
        self._stats.active_sequences += delta


class _Answer:
    """The deterministic answer to one prompt, and the faults it asked for."""

    def __init__(self, request: GenerationRequest, natural_length: int) -> None:
        prompt = request.prompt_tokens
        sampling = request.sampling
        self._key = zlib.crc32(repr((prompt, sampling.seed)).encode())
        natural_end = max(natural_length, sampling.min_tokens)
        if sampling.ignore_eos:
            natural_end = sampling.max_tokens + 1
        self.length = min(natural_end, sampling.max_tokens)
        self.finish_reason: FinishReason = "length" if sampling.max_tokens < natural_end else "stop"
        self._error_at = _fault_position(prompt, _ERROR_BASE)
        self._hang_at = _fault_position(prompt, _HANG_BASE)

    def word(self, index: int) -> str:
        return WORDS[zlib.crc32(f"{self._key}:{index}".encode()) % len(WORDS)]

    async def fault_before(self, index: int, sleep: Sleep) -> None:
        if self._error_at == index:
            raise BackendError(f"simulated engine failure at token {index}")
        if self._hang_at == index:
            while True:
                await sleep(3600.0)


def _word_id(word: str, salt: int) -> int:
    return zlib.crc32(f"{word}/{salt}".encode()) % 49_152


def _spaced(word: str, index: int) -> str:
    return word if index == 0 else " " + word


def _fault_tokens(content: str) -> list[int]:
    out = []
    for kind, count in _FAULT.findall(content):
        base = _ERROR_BASE if kind == "error" else _HANG_BASE
        out.append(base - int(count))
    return out


def _fault_position(prompt: Sequence[int], base: int) -> int | None:
    for token in prompt:
        if base - 999_999 <= token <= base:
            return base - token
    return None
