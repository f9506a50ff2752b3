"""One backend stream of a job (runtime/stream.py): a stall is "no token for
`stall_timeout`", however long the whole answer takes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import pytest

from flexserve.backends.base import (
    BackendError,
    Chunk,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from flexserve.runtime import Done, JobHandle, Started, Submission, Token
from flexserve.runtime.commands import Command, Ended, Produced
from flexserve.runtime.stream import stream_job

STALL = 0.3


class Paced:
    """Yields one token after each gap (seconds), then the finish."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        for n, gap in enumerate(self.gaps):
            await asyncio.sleep(gap)
            yield TokenChunk(n, f"t{n} ")
        yield Finish("stop")


def run(gaps: list[float]) -> tuple[JobHandle, list[Command]]:
    sub = Submission("req_1", "t", "default", "m", (1, 2), SamplingParams(max_tokens=99), 60.0)
    handle = JobHandle(sub, arrival=0.0)
    posted: list[Command] = []
    backend = Paced(gaps)
    asyncio.run(stream_job(backend, handle, posted.append, STALL))  # type: ignore[arg-type]
    return handle, posted


def test_an_answer_longer_than_the_stall_timeout_is_no_stall_while_tokens_keep_coming() -> None:
    handle, posted = run([STALL / 2] * 6)  # 0.9 s in all, never 0.3 s without a token
    ended = posted[-1]
    assert isinstance(ended, Ended) and ended.error is None and ended.finish is not None
    assert len(handle.produced) == 6
    assert sum(isinstance(c, Produced) for c in posted) == 6


def test_no_token_for_the_stall_timeout_ends_the_job_as_an_engine_failure() -> None:
    handle, posted = run([0.0, 0.0, STALL * 3])
    (*_, ended) = posted
    assert isinstance(ended, Ended) and isinstance(ended.error, BackendError)
    assert "no token" in str(ended.error)
    assert len(handle.produced) == 2  # what came before the stall is kept


def test_a_listener_takes_the_queued_events_first_then_each_as_it_is_emitted() -> None:
    async def scenario() -> tuple[list[object], bool]:
        sub = Submission("req_1", "t", "default", "m", (1,), SamplingParams(max_tokens=9), 60.0)
        handle = JobHandle(sub, arrival=0.0)
        handle.emit(Started(resumed=False))  # before anyone listens: queued
        taken: list[object] = []
        handle.listen(taken.append)
        handle.emit(Token(TokenChunk(7, "x")))
        handle.emit(Done("stop", ""))
        return taken, handle.events.empty()

    taken, queue_empty = asyncio.run(scenario())
    assert [type(event) for event in taken] == [Started, Token, Done]
    assert queue_empty


def test_a_listener_that_raises_is_logged_and_the_runtime_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = Submission("req_9", "t", "default", "m", (1,), SamplingParams(max_tokens=9), 60.0)
    handle = JobHandle(sub, arrival=0.0)

    def broken(event: object) -> None:
        raise RuntimeError("a bug in the submitter")

    handle.listen(broken)
    with caplog.at_level(logging.ERROR, "flexserve.runtime"):
        handle.emit(Done("stop", ""))  # raises nothing into the runtime's task
    assert "event listener failed request_id=req_9" in caplog.text
