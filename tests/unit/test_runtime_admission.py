"""The runtime's answers to the scheduler's admission decisions (issue 6, item 3)."""

from __future__ import annotations

import asyncio

from flexserve.backends.base import ChatMessage, SamplingParams
from flexserve.backends.simulated import SimulatedBackend
from flexserve.config import SchedulerSettings, SimulatedSettings
from flexserve.errors import Overloaded
from flexserve.runtime import Failed, JobEvent, Runtime, Started, Submission


def test_interactive_request_over_a_full_interactive_queue_is_overloaded_at_once() -> None:
    async def run() -> list[JobEvent]:
        sim = SimulatedBackend(
            "m", 1, SimulatedSettings(ttft_ms=1, tpot_ms=50, natural_output_tokens=500)
        )
        runtime = Runtime(sim, SchedulerSettings(interactive_queue_max_jobs=1))
        await runtime.start()
        prompt = sim.encode_chat([ChatMessage("user", "hi")])

        def submit(request_id: str) -> asyncio.Queue[JobEvent]:
            sub = Submission(
                request_id, "t", "default", "m", prompt, SamplingParams(max_tokens=100), 60.0
            )
            return runtime.submit(sub).events

        running = submit("running")
        assert isinstance(await asyncio.wait_for(running.get(), 5), Started)
        submit("queued")
        over = submit("over")
        event = await asyncio.wait_for(over.get(), 5)
        await runtime.close()
        return [event]

    (event,) = asyncio.run(run())

    assert isinstance(event, Failed) and isinstance(event.error, Overloaded)
