"""The runtime shell: one task owns the scheduler; preempt = pause; cancel frees the slot."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence

import pytest

from flexserve.backends.base import (
    BackendError,
    ChatMessage,
    Chunk,
    GenerationRequest,
    NoBackendAvailable,
    SamplingParams,
    TokenChunk,
)
from flexserve.backends.simulated import SimulatedBackend
from flexserve.config import SchedulerSettings, SimulatedSettings
from flexserve.errors import EngineFailure, Overloaded
from flexserve.runtime import (
    Done,
    Failed,
    JobEvent,
    JobHandle,
    Outcome,
    Runtime,
    Started,
    Submission,
    Token,
)
from flexserve.scheduling import Plan
from flexserve.scheduling.tiers import Tier

FAST = SimulatedSettings(ttft_ms=1, tpot_ms=2, natural_output_tokens=25)


def submission(
    sim: SimulatedBackend,
    request_id: str,
    tier: Tier,
    text: str,
    *,
    max_tokens: int = 100,
    stream: bool = False,
) -> Submission:
    prompt = sim.encode_chat([ChatMessage("user", text)])
    sampling = SamplingParams(max_tokens=max_tokens)
    return Submission(request_id, "t", tier, "m", prompt, sampling, 60.0, stream=stream)


async def slow_runtime(slots: int = 1) -> tuple[SimulatedBackend, Runtime]:
    """Long answers: a job holds its slot until told otherwise."""
    sim = SimulatedBackend(
        "m", slots, SimulatedSettings(ttft_ms=1, tpot_ms=50, natural_output_tokens=500)
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


# ---- supervision: nobody waits on a dead loop or a broken engine ----------------------


class Settled:
    """A settle function that records each job's outcome and what it had produced."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[Outcome, int]] = {}

    async def __call__(self, handle: JobHandle, outcome: Outcome) -> None:
        self.outcomes[handle.request_id] = (outcome, len(handle.produced))


async def until_failed(handle: JobHandle) -> Failed:
    event = (await drain(handle))[-1]
    assert isinstance(event, Failed)
    return event


@pytest.mark.parametrize("broken", ["arrive", "step"])
def test_a_dead_loop_fails_every_waiter_at_once(broken: str) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("injected scheduler fault")

    async def run() -> tuple[list[Failed], Failed, str | None]:
        sim, runtime = await slow_runtime()
        running = runtime.submit(submission(sim, "running", "default", "x"))
        assert isinstance(await running.events.get(), Started)
        waiting = runtime.submit(submission(sim, "waiting", "flex", "y"))
        await asyncio.sleep(0.05)  # the flex job is queued behind the interactive one
        setattr(runtime.scheduler, broken, boom)
        trigger = runtime.submit(submission(sim, "trigger", "priority", "z"))
        failed = [await until_failed(h) for h in (running, waiting, trigger)]
        later = runtime.submit(submission(sim, "later", "default", "w"))
        immediate = later.events.get_nowait()  # answered without any loop
        assert isinstance(immediate, Failed)
        await runtime.close()
        return failed, immediate, runtime.failure

    failed, immediate, failure = asyncio.run(run())
    assert all(event.error.status == 500 for event in [*failed, immediate])
    assert failure == "the runtime task died: RuntimeError"


def test_a_dead_loop_bills_a_stream_for_the_tokens_its_client_received() -> None:
    outcomes: dict[str, str] = {}

    async def record(handle: JobHandle, outcome: Outcome) -> None:
        outcomes[handle.request_id] = outcome

    def boom(*args: object) -> None:
        raise RuntimeError("injected scheduler fault")

    async def run() -> None:
        sim, runtime = await slow_runtime(slots=2)
        runtime.set_settle(record)
        streamed = runtime.submit(submission(sim, "streamed", "default", "x", stream=True))
        answer = runtime.submit(submission(sim, "answer", "default", "y"))
        for handle in (streamed, answer):
            assert isinstance(await handle.events.get(), Started)
            assert isinstance(await handle.events.get(), Token)  # tokens were produced
        runtime.scheduler.step = boom  # type: ignore[method-assign]
        runtime.submit(submission(sim, "trigger", "priority", "z"))
        await until_failed(streamed)
        await runtime.close()

    asyncio.run(run())
    # The stream's client got its tokens: billed. The JSON answer never went out: free.
    assert outcomes["streamed"] == "cancelled" and outcomes["answer"] == "failed"


class EngineBug(SimulatedBackend):
    """`generate` fails before yielding for prompts that say 'bug': sync or async."""

    def __init__(self, synchronous: bool) -> None:
        super().__init__("m", 1, FAST)
        self.synchronous = synchronous

    def generate(  # type: ignore[override]
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        if BUG not in request.prompt_tokens:
            return super().generate(request, resume)
        if self.synchronous:
            raise RuntimeError("engine bug")
        return self._fail()

    async def _fail(self) -> AsyncIterator[Chunk]:
        raise BackendError("engine failed before its first token")
        yield  # an async generator all the same


BUG = SimulatedBackend("m", 1).encode_chat([ChatMessage("user", "bug")])[-1]


@pytest.mark.parametrize("synchronous", [True, False])
@pytest.mark.parametrize("tier", ["default", "flex"])
def test_generate_failing_before_yielding_fails_the_job_and_frees_its_slot(
    synchronous: bool, tier: Tier
) -> None:
    async def run() -> tuple[Failed, list[JobEvent], list[str]]:
        sim = EngineBug(synchronous)
        runtime = Runtime(sim, SchedulerSettings())
        await runtime.start()
        failed = await until_failed(runtime.submit(submission(sim, "bad", tier, "bug")))
        after = await drain(runtime.submit(submission(sim, "good", tier, "fine")))
        running = runtime.scheduler.running_ids()
        await runtime.close()
        return failed, after, running

    failed, after, running = asyncio.run(run())
    assert isinstance(failed.error, EngineFailure) and failed.error.status == 500
    assert isinstance(after[0], Started) and isinstance(after[-1], Done)
    assert running == []


# ---- shutdown: drain ------------------------------------------------------------------


def test_drain_ends_flex_at_once_lets_interactive_finish_and_refuses_new_work() -> None:
    async def run() -> tuple[list[JobEvent], list[JobEvent], JobEvent, Settled]:
        settled = Settled()
        sim, runtime = await slow_runtime(slots=2)
        runtime.set_settle(settled)
        flex = runtime.submit(submission(sim, "flex", "flex", "f", stream=True))
        fast = runtime.submit(submission(sim, "fast", "default", "d", max_tokens=3))
        flex_events = [await flex.events.get(), await flex.events.get()]  # Started, Token
        shutdown = asyncio.create_task(runtime.shutdown(grace=60))
        flex_events += await drain(flex)
        fast_events = await drain(fast)
        late = runtime.submit(submission(sim, "late", "priority", "p"))
        late_event = (await drain(late))[-1]
        await shutdown
        await runtime.close()
        return flex_events, fast_events, late_event, settled

    flex, fast, late, settled = asyncio.run(run())
    assert isinstance(flex[-1], Failed) and flex[-1].error.status == 503
    assert flex[-1].error.retry_after is not None
    assert isinstance(fast[-1], Done)
    assert isinstance(late, Failed) and late.error.status == 503
    produced = len([e for e in flex if isinstance(e, Token)])
    assert settled.outcomes["flex"] == ("cancelled", produced)  # billed what it streamed
    assert settled.outcomes["fast"] == ("completed", 3)
    assert settled.outcomes["late"][0] == "overloaded"  # refused: not billed


def test_past_the_grace_interactive_jobs_end_billed_only_for_what_was_streamed() -> None:
    async def run() -> tuple[dict[str, JobEvent], Settled]:
        settled = Settled()
        sim, runtime = await slow_runtime(slots=2)
        runtime.set_settle(settled)
        streamed = runtime.submit(submission(sim, "streamed", "default", "s", stream=True))
        whole = runtime.submit(submission(sim, "whole", "default", "w"))
        queued = runtime.submit(submission(sim, "queued", "default", "q"))
        for handle in (streamed, whole):
            assert isinstance(await handle.events.get(), Started)
            assert isinstance(await handle.events.get(), Token)
        await runtime.shutdown(grace=0.1)
        last = {h.request_id: (await drain(h))[-1] for h in (streamed, whole, queued)}
        await runtime.close()
        return last, settled

    last, settled = asyncio.run(run())
    for event in last.values():
        assert isinstance(event, Failed) and event.error.status == 503
    assert settled.outcomes["streamed"][0] == "cancelled"  # the client has the tokens
    assert settled.outcomes["whole"][0] == "failed"  # its client gets only the 503
    assert settled.outcomes["queued"][0] == "overloaded"  # never started


class _DownThenUp:
    """A backend with no healthy engine for the first `down_calls` calls (its breaker
    open), then a working one."""

    def __init__(self, down_calls: int) -> None:
        self.sim = SimulatedBackend("m", 1, FAST)
        self.down_calls = down_calls
        self.calls = 0
        self.name, self.model, self.slots = "flaky", "m", 1
        self.context_length, self.can_pause, self.estimates_tokens = 8192, True, True

    def __getattr__(self, name: str) -> object:
        return getattr(self.sim, name)

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        self.calls += 1
        if self.calls <= self.down_calls:
            raise NoBackendAvailable("no healthy backend for model m", retry_in=0.01)
        async for chunk in self.sim.generate(request, resume):
            yield chunk


@pytest.mark.parametrize("tier", ["flex", "batch"])
def test_flex_and_batch_wait_out_an_outage_instead_of_failing(tier: Tier) -> None:
    """DESIGN: flex/batch are requeued until their deadline; an open breaker is not an
    engine failure (before: three instant retries, then a 500)."""

    async def run() -> tuple[list[JobEvent], int]:
        backend = _DownThenUp(down_calls=10)
        runtime = Runtime(backend, SchedulerSettings())  # type: ignore[arg-type]
        await runtime.start()
        events = await drain(runtime.submit(submission(backend.sim, "j", tier, "hi")))
        await runtime.close()
        return events, backend.calls

    events, calls = asyncio.run(run())
    assert isinstance(events[-1], Done) and calls == 11


def test_interactive_work_with_no_healthy_backend_is_a_503_with_retry_after() -> None:
    async def run() -> list[JobEvent]:
        backend = _DownThenUp(down_calls=100)
        runtime = Runtime(backend, SchedulerSettings())  # type: ignore[arg-type]
        await runtime.start()
        events = await drain(runtime.submit(submission(backend.sim, "j", "default", "hi")))
        await runtime.close()
        return events

    last = asyncio.run(run())[-1]
    assert isinstance(last, Failed) and isinstance(last.error, Overloaded)
    assert last.error.retry_after is not None and last.error.retry_after > 0


def test_a_settle_that_raises_at_once_fails_no_other_job_and_keeps_the_loop() -> None:
    """The app's settle is a plain function now (it returns the bill's future): if it
    raised on the runtime's task, every job would fail with the loop."""

    def broken_settle(handle: JobHandle, outcome: Outcome) -> asyncio.Future[None]:
        raise RuntimeError("a bug in counting")

    async def run() -> tuple[list[JobEvent], list[JobEvent], str | None]:
        sim = SimulatedBackend("m", 1, FAST)
        runtime = Runtime(sim, SchedulerSettings(), settle=broken_settle)
        await runtime.start()
        first = await drain(runtime.submit(submission(sim, "a", "default", "one", max_tokens=3)))
        second = await drain(runtime.submit(submission(sim, "b", "default", "two", max_tokens=3)))
        failure = runtime.failure
        await runtime.close()
        return first, second, failure

    first, second, failure = asyncio.run(run())
    assert isinstance(first[-1], Done) and isinstance(second[-1], Done)
    assert failure is None


def test_the_runtime_steps_at_the_schedulers_wakeup_with_no_command() -> None:
    """Deadlines and rate rolls come due with nothing posted: the runtime's timer posts a
    `Wakeup` at the scheduler's next wakeup, and is set anew when that time moves."""

    async def run() -> list[float]:
        sim = SimulatedBackend("m", 1, SimulatedSettings(ttft_ms=1, tpot_ms=1))
        runtime = Runtime(sim, SchedulerSettings())
        wakeups = [runtime.clock() + 0.02, runtime.clock() + 0.04]
        stepped = asyncio.Event()
        real_step = runtime.scheduler.step

        def next_wakeup() -> float:
            return wakeups[0] if wakeups else math.inf

        def step(now: float) -> Plan:
            if wakeups and now >= wakeups[0]:
                wakeups.pop(0)
                if not wakeups:
                    stepped.set()
            return real_step(now)

        runtime.scheduler.next_wakeup = next_wakeup  # type: ignore[method-assign]
        runtime.scheduler.step = step  # type: ignore[method-assign]
        await runtime.start()
        try:
            await asyncio.wait_for(stepped.wait(), timeout=10)
        finally:
            await runtime.close()
        return wakeups

    assert asyncio.run(run()) == []  # each wakeup was stepped at (or after) its time
