"""A job's settle, after the engine's count of its prompt where its stream was cut.

An upstream engine reports the prompt's tokens in its usage, at the end of its stream. A
stream cut before then (the client left, a shutdown) is billed its input all the same:
so the engine is asked to count the prompt first (backends/upstream/prompt_count.py),
and the bill holds flexserve's estimate only when it cannot say. The ask is bounded
(`PROMPT_COUNT_TIMEOUT`); whatever goes wrong with it, the job is still settled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from flexserve.backends.base import Backend, CountsPrompts
from flexserve.runtime.events import JobHandle
from flexserve.runtime.outcomes import Outcome
from flexserve.runtime.stream import generation_request

log = logging.getLogger("flexserve.runtime")

PROMPT_COUNT_TIMEOUT = 10.0
"""Seconds a cut job's bill waits for the engine's count of its prompt (else estimated);
a shutdown's drain may wait this long past its grace for the last such bills."""

Settle = Callable[[JobHandle, Outcome], Awaitable[None]]
"""Counts and bills a job's outcome. A future it returns is the job's `settled` as is (the
app's: no task per job); a coroutine runs as a task."""


def settle_counted(
    backend: Backend, settle: Settle, handle: JobHandle, outcome: Outcome
) -> Awaitable[None]:
    """`settle(handle, outcome)`, first asking the engine to count the prompt when the
    job's input is billed and no usage of the engine's came."""
    cut = outcome == "cancelled" and handle.engine_prompt_tokens is None
    if cut and isinstance(backend, CountsPrompts):
        return _count_then_settle(backend, settle, handle, outcome)
    return settle(handle, outcome)


async def _count_then_settle(
    backend: CountsPrompts, settle: Settle, handle: JobHandle, outcome: Outcome
) -> None:
    try:
        async with asyncio.timeout(PROMPT_COUNT_TIMEOUT):
            handle.engine_prompt_tokens = await backend.engine_prompt_tokens(
                generation_request(handle)
            )
    except Exception as error:  # the bill goes on with the estimate, whatever happened
        log.warning(
            "no engine count of the prompt request_id=%s (%s): the estimate is billed",
            handle.request_id,
            type(error).__name__,
        )
    await settle(handle, outcome)
