"""The simulated engine: deterministic text, exact resume, timing model, faults."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexserve.backends.base import (
    BackendError,
    ChatMessage,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from flexserve.backends.simulated import SimulatedBackend
from flexserve.config import SimulatedSettings


class RecordingSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def backend(sleep: RecordingSleep | None = None, **sim: float) -> SimulatedBackend:
    return SimulatedBackend("m", 2, SimulatedSettings(**sim), sleep=sleep or RecordingSleep())


def request(sim: SimulatedBackend, text: str, max_tokens: int = 100) -> GenerationRequest:
    prompt = sim.encode_chat([ChatMessage("user", text)])
    return GenerationRequest("r", prompt, SamplingParams(max_tokens=max_tokens))


async def collect(
    sim: SimulatedBackend,
    req: GenerationRequest,
    resume: Sequence[TokenChunk] = (),
    stop_after: int | None = None,
) -> tuple[list[TokenChunk], Finish | None]:
    tokens: list[TokenChunk] = []
    stream = sim.generate(req, resume)
    async for chunk in stream:
        if isinstance(chunk, Finish):
            return tokens, chunk
        tokens.append(chunk)
        if stop_after is not None and len(tokens) == stop_after:
            await stream.aclose()  # type: ignore[attr-defined]
            return tokens, None
    return tokens, None


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=6), max_size=5))
def test_output_is_the_same_however_often_it_was_preempted(cuts: list[int]) -> None:
    sim = backend(natural_output_tokens=20)
    req = request(sim, "tell me a story")

    async def run() -> tuple[list[TokenChunk], list[TokenChunk]]:
        whole, _ = await collect(sim, req)
        produced: list[TokenChunk] = []
        for cut in cuts:
            more, finish = await collect(sim, req, produced, stop_after=cut)
            produced += more
            if finish is not None:
                return whole, produced
        rest, _ = await collect(sim, req, produced)
        return whole, produced + rest

    whole, pieced = asyncio.run(run())
    assert [t.token_id for t in pieced] == [t.token_id for t in whole]
    assert "".join(t.text for t in pieced) == "".join(t.text for t in whole)


def test_max_tokens_gives_length_and_natural_end_gives_stop() -> None:
    sim = backend(natural_output_tokens=10)
    tokens, finish = asyncio.run(collect(sim, request(sim, "hi", max_tokens=4)))
    assert len(tokens) == 4 and finish == Finish("length")
    tokens, finish = asyncio.run(collect(sim, request(sim, "hi", max_tokens=50)))
    assert len(tokens) == 10 and finish == Finish("stop")


def test_timing_model_ttft_from_prefill_and_tpot_per_token() -> None:
    sleep = RecordingSleep()
    sim = backend(sleep, ttft_ms=100, ttft_per_prompt_token_ms=1, tpot_ms=10)
    req = request(sim, "one two three", max_tokens=3)
    asyncio.run(collect(sim, req))
    assert sleep.calls == pytest.approx([(100 + len(req.prompt_tokens)) / 1000, 0.01, 0.01])


def test_resume_reprefills_prompt_plus_produced() -> None:
    sleep = RecordingSleep()
    sim = backend(sleep, ttft_ms=0, ttft_per_prompt_token_ms=1, tpot_ms=10)
    req = request(sim, "x", max_tokens=5)
    first, _ = asyncio.run(collect(sim, req, stop_after=2))
    sleep.calls.clear()
    asyncio.run(collect(sim, req, first))
    assert sleep.calls[0] == pytest.approx((len(req.prompt_tokens) + 2) / 1000)


def test_tpot_grows_with_active_sequences() -> None:
    sleep = RecordingSleep()
    sim = backend(sleep, ttft_ms=0, ttft_per_prompt_token_ms=0, tpot_ms=10, tpot_growth=0.5)

    async def two_at_once() -> None:
        await asyncio.gather(
            collect(sim, request(sim, "a", max_tokens=2)),
            collect(sim, request(sim, "b", max_tokens=2)),
        )

    asyncio.run(two_at_once())
    assert max(sleep.calls) == pytest.approx(0.015)


def test_injected_error_fails_after_n_tokens() -> None:
    sim = backend(fault_markers=True)
    req = request(sim, "please [sim:error@3]")
    produced: list[TokenChunk] = []

    async def run() -> None:
        async for chunk in sim.generate(req):
            assert isinstance(chunk, TokenChunk)
            produced.append(chunk)

    with pytest.raises(BackendError):
        asyncio.run(run())
    assert len(produced) == 3


def test_busy_slot_seconds_integrates_active_sequences() -> None:
    now = [0.0]
    sim = SimulatedBackend(
        "m", 2, SimulatedSettings(), sleep=RecordingSleep(), clock=lambda: now[0]
    )

    async def run() -> None:
        stream = sim.generate(request(sim, "a", max_tokens=3))
        await anext(stream)  # type: ignore[arg-type]
        now[0] = 2.0
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    now[0] = 5.0
    assert sim.stats().busy_slot_seconds == pytest.approx(2.0)
    assert sim.stats().active_sequences == 0


def sampled(sim: SimulatedBackend, text: str, **params: object) -> GenerationRequest:
    prompt = sim.encode_chat([ChatMessage("user", text)])
    return GenerationRequest("r", prompt, SamplingParams(**params))  # type: ignore[arg-type]


def test_fault_markers_are_plain_text_unless_turned_on() -> None:
    sim = backend(natural_output_tokens=5)
    tokens, finish = asyncio.run(collect(sim, request(sim, "please [sim:error@0]")))
    assert len(tokens) == 5 and finish == Finish("stop")
    hang = backend(natural_output_tokens=5)
    tokens, finish = asyncio.run(collect(hang, request(hang, "[sim:hang@1]")))
    assert len(tokens) == 5 and finish == Finish("stop")


def test_min_tokens_holds_the_natural_end_back() -> None:
    sim = backend(natural_output_tokens=4)
    plain, _ = asyncio.run(collect(sim, sampled(sim, "hi", max_tokens=50)))
    tokens, finish = asyncio.run(collect(sim, sampled(sim, "hi", max_tokens=50, min_tokens=9)))
    assert len(tokens) == 9 and finish == Finish("stop")
    assert [t.token_id for t in tokens[:4]] == [t.token_id for t in plain]
    tokens, finish = asyncio.run(collect(sim, sampled(sim, "hi", max_tokens=6, min_tokens=6)))
    assert len(tokens) == 6 and finish == Finish("stop")


def test_min_tokens_holds_stop_strings_back() -> None:
    sim = backend(natural_output_tokens=30)
    whole, _ = asyncio.run(collect(sim, sampled(sim, "story", max_tokens=50)))
    words = [t.text.strip() for t in whole]
    stop = words[2]
    first = words.index(stop)
    tokens, finish = asyncio.run(collect(sim, sampled(sim, "story", max_tokens=50, stop=(stop,))))
    assert len(tokens) == first and finish == Finish("stop")
    later = [i for i, w in enumerate(words) if w == stop and i >= first + 1]
    held = sampled(sim, "story", max_tokens=50, stop=(stop,), min_tokens=first + 1)
    tokens, finish = asyncio.run(collect(sim, held))
    assert finish == Finish("stop")
    assert len(tokens) == (later[0] if later else 30)
    assert stop in [t.text.strip() for t in tokens]


def test_ignore_eos_generates_up_to_max_tokens() -> None:
    sim = backend(natural_output_tokens=4)
    tokens, finish = asyncio.run(collect(sim, sampled(sim, "hi", max_tokens=10, ignore_eos=True)))
    assert len(tokens) == 10 and finish == Finish("length")


def test_top_k_and_repetition_penalty_leave_the_text_alone() -> None:
    sim = backend(natural_output_tokens=8)
    plain, _ = asyncio.run(collect(sim, sampled(sim, "hi", max_tokens=50)))
    other = sampled(sim, "hi", max_tokens=50, top_k=5, repetition_penalty=1.3)
    tokens, _ = asyncio.run(collect(sim, other))
    assert [t.text for t in tokens] == [t.text for t in plain]
