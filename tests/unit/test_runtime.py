"""The runtime shell: one task owns the scheduler; preempt = pause; cancel frees the slot."""

from __future__ import annotations

import asyncio

from flexserve.backends.base import ChatMessage, SamplingParams
from flexserve.backends.simulated import SimulatedBackend
from flexserve.config import SchedulerSettings, SimulatedSettings
from flexserve.errors import Overloaded
from flexserve.runtime import (
    Done,
    Failed,
    JobEvent,
    JobHandle,
    Runtime,
    Started,
    Submission,
    Token,
)
from flexserve.scheduling.tiers import Tier

FAST = SimulatedSettings(ttft_ms=1, tpot_ms=2, natural_output_tokens=25)


def submission(sim: SimulatedBackend, request_id: str, tier: Tier, text: str) -> Submission:
    prompt = sim.encode_chat([ChatMessage("user", text)])
    return Submission(request_id, "t", tier, "m", prompt, SamplingParams(max_tokens=100), 60.0)


async def slow_runtime() -> tuple[SimulatedBackend, Runtime]:
    """One slot, long answers: a job holds its slot until told otherwise."""
    sim = SimulatedBackend(
        "m", 1, SimulatedSettings(ttft_ms=1, tpot_ms=50, natural_output_tokens=500)
    )
    runtime = Runtime(sim, SchedulerSettings())
    await runtime.start()
    return sim, runtime


async def drain(handle: JobHandle) -> list[JobEvent]:
    events: list[JobEvent] = []
    while not events or not isinstance(events[-1], Done | Failed):
        events.append(await asyncio.wait_for(handle.events.get(), 10))
    return events


def texts(events: list[JobEvent]) -> str:
    return "".join(e.chunk.text for e in events if isinstance(e, Token))


def test_preempted_job_pauses_then_resumes_without_duplicates() -> None:
    async def run() -> tuple[list[JobEvent], list[JobEvent], list[JobEvent]]:
        sim = SimulatedBackend("m", 1, FAST)
        runtime = Runtime(sim, SchedulerSettings())
        await runtime.start()
        alone = await drain(runtime.submit(submission(sim, "ref", "flex", "story")))
        flex = runtime.submit(submission(sim, "flex", "flex", "story"))
        events = [await flex.events.get() for _ in range(4)]  # Started + 3 tokens
        urgent = runtime.submit(submission(sim, "urgent", "default", "now"))
        events += await drain(flex)
        interactive = await drain(urgent)
        await runtime.close()
        return alone, events, interactive

    alone, flex, interactive = asyncio.run(run())
    kinds = [type(e).__name__ for e in flex if not isinstance(e, Token)]
    assert kinds == ["Started", "Paused", "Started", "Done"]
    assert flex[0] == Started(resumed=False)
    assert Started(resumed=True) in flex
    assert texts(flex) == texts(alone)
    assert isinstance(interactive[-1], Done)


def test_cancel_frees_the_slot_for_the_next_job() -> None:
    async def run() -> list[str]:
        sim, runtime = await slow_runtime()
        first = runtime.submit(submission(sim, "a", "flex", "long"))
        assert isinstance(await first.events.get(), Started)
        second = runtime.submit(submission(sim, "b", "flex", "next"))
        runtime.cancel("a")
        started = await asyncio.wait_for(second.events.get(), 10)
        assert isinstance(started, Started)
        running = runtime.scheduler.running_ids()
        await runtime.close()
        return running

    assert asyncio.run(run()) == ["b"]


def test_shutdown_answers_every_waiter() -> None:
    async def run() -> JobEvent:
        sim, runtime = await slow_runtime()
        handle = runtime.submit(submission(sim, "a", "default", "x"))
        assert isinstance(await handle.events.get(), Started)
        await runtime.close()
        event = await handle.events.get()
        while isinstance(event, Token):
            event = await handle.events.get()
        return event

    event = asyncio.run(run())
    assert isinstance(event, Failed) and isinstance(event.error, Overloaded)
