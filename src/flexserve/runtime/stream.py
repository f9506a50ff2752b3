"""One backend stream of a job: generate from prompt + what it produced, deliver each
token to its handler and report it to the runtime, end with exactly one `Ended`.

A stall (no token for `stall_timeout`, caught within a small slack), an engine that
raises, or a stream that ends without a finish is an engine failure of this job, never of
the server; a cancel (a preemption, the client gone) closes the engine's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from flexserve.backends.base import (
    Backend,
    BackendError,
    Chunk,
    EngineRefused,
    Finish,
    GenerationRequest,
)
from flexserve.runtime.commands import Command, Ended, Produced
from flexserve.runtime.events import JobHandle, Token
from flexserve.scheduling import RANK, is_interactive

log = logging.getLogger("flexserve.runtime")


async def stream_job(
    backend: Backend, handle: JobHandle, post: Callable[[Command], None], stall_timeout: float
) -> None:
    """Run the job on `backend` until it ends (then `post(Ended(...))`) or is cancelled."""
    sub = handle.submission
    chunks: AsyncIterator[Chunk] | None = None
    try:
        # Inside the try: a `generate` that raises before returning an iterator is an
        # engine failure of this job like any other (it must not leave the slot held).
        chunks = backend.generate(generation_request(handle), tuple(handle.produced))
        ended = await _pump(handle, chunks, post, stall_timeout)
    except (BackendError, EngineRefused) as error:
        ended = Ended(sub.request_id, None, error)
    except asyncio.CancelledError:
        await _close(chunks)
        raise
    except Exception as error:  # an engine bug must fail one request, not the server
        log.exception("engine raised request_id=%s", sub.request_id)
        ended = Ended(sub.request_id, None, BackendError(type(error).__name__))
    # Report first: a preemption during a slow close must not lose the finish.
    post(ended)
    await _close(chunks)


def generation_request(handle: JobHandle) -> GenerationRequest:
    sub = handle.submission
    return GenerationRequest(
        sub.request_id,
        sub.prompt_tokens,
        sub.sampling,
        priority=len(RANK) - RANK[sub.tier],  # priority 4 ... batch 1
        background=not is_interactive(sub.tier),
        messages=sub.messages,
        tier=sub.tier,
        prompt_text=sub.prompt_text,
    )


STALL_SLACK = 0.1
MAX_STALL_SLACK = 1.0
"""A stall is caught between `stall_timeout` and a little past it (10 %, at most 1 s), so
that the deadline moves at most once per slack, not at every token (moving it cost a
share of a short request's CPU)."""


async def _pump(
    handle: JobHandle,
    chunks: AsyncIterator[Chunk],
    post: Callable[[Command], None],
    stall_timeout: float,
) -> Ended:
    loop = asyncio.get_running_loop()
    moved = loop.time()
    slack = min(stall_timeout * STALL_SLACK, MAX_STALL_SLACK)
    try:
        async with asyncio.timeout(stall_timeout + slack) as stall:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    raise BackendError("stream ended without a finish") from None
                if isinstance(chunk, Finish):
                    return Ended(handle.request_id, chunk)
                now = loop.time()
                if now - moved > slack:
                    moved = now
                    stall.reschedule(now + stall_timeout + slack)
                handle.produced.append(chunk)
                handle.emit(Token(chunk))
                post(Produced(handle.request_id))
    except TimeoutError:
        raise BackendError(f"no token for {stall_timeout:.0f} s") from None


async def _close(chunks: AsyncIterator[Chunk] | None) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
