"""Small pieces of the request path: where validation runs, request ids, and how a
stream's events are written."""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace
from typing import Any

from flexserve.api.body import new_request_id
from flexserve.api.jobs import Answer
from flexserve.api.validation import run_validation
from flexserve.api.waits import first_done, heartbeat_due
from flexserve.backends.base import SamplingParams, TokenChunk
from flexserve.runtime import Done, JobHandle, Submission, Token


def thread_that_validates(estimates_tokens: bool) -> int:
    async def run() -> int:
        served: Any = SimpleNamespace(backend=SimpleNamespace(estimates_tokens=estimates_tokens))
        return await run_validation(served, threading.get_ident)

    return asyncio.run(run())


def test_validation_runs_on_the_event_loop_only_where_tokens_are_estimated() -> None:
    here = threading.get_ident()  # asyncio.run runs its loop on this thread
    assert thread_that_validates(estimates_tokens=True) == here
    assert thread_that_validates(estimates_tokens=False) != here  # a real tokenizer: off it


def test_request_ids_are_unique_and_shaped_as_before() -> None:
    ids = [new_request_id() for _ in range(5000)]  # past several refills of its pool
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("req_") and len(i) == 4 + 24 for i in ids)
    int(ids[0].removeprefix("req_"), 16)  # hex


def test_a_forked_process_does_not_repeat_its_parents_ids() -> None:
    new_request_id()  # the pool holds ids the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id, leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != new_request_id()


class Shape:
    """Each token an event of its own, as every API writes them."""

    def opening(self) -> list[str]:
        return ["data: open\n\n"]

    def delta(self, text: str, tokens: int) -> list[str]:
        return [f"data: {text}\n\n"]

    def closing(self, text: str, finish_reason: str, usage: dict[str, int]) -> list[str]:
        return ["data: [DONE]\n\n"]

    def failure(self, error: Exception) -> list[str]:
        return ["data: error\n\n"]


def answer_of(handle: JobHandle, cancelled: list[str] | None = None) -> Answer:
    state: Any = SimpleNamespace(
        settings=SimpleNamespace(paused_heartbeat=30.0),
        metrics=SimpleNamespace(ttft_for=lambda tier: SimpleNamespace(observe=lambda s: None)),
    )
    cancels = cancelled if cancelled is not None else []
    runtime = SimpleNamespace(clock=lambda: 0.0, cancel=cancels.append)
    served: Any = SimpleNamespace(runtime=runtime)
    valid: Any = SimpleNamespace(tier="default")
    return Answer(state, served, handle, valid, Shape())  # type: ignore[arg-type]


def test_tokens_waiting_together_go_out_in_one_write_each_its_own_event() -> None:
    cancelled: list[str] = []  # jobs the answer cancelled: one that ends with Done, none

    async def run() -> list[str]:
        sub = Submission("req_1", "t", "default", "m", (1,), SamplingParams(max_tokens=9), 60.0)
        handle = JobHandle(sub, arrival=0.0)
        events = answer_of(handle, cancelled).sse()
        writes = [await anext(events)]  # the opening
        for text in ("a", "b", "c"):  # arrived in one read from the engine
            handle.events.put_nowait(Token(TokenChunk(0, text)))
        writes.append(await anext(events))
        later = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)
        assert not later.done()  # nothing waits to be written: the stream waits
        handle.events.put_nowait(Token(TokenChunk(0, "d")))  # a token alone: written alone
        writes.append(await later)
        handle.events.put_nowait(Done("stop", ""))
        writes.extend([chunk async for chunk in events])
        return writes

    writes = asyncio.run(run())
    assert cancelled == []
    assert writes == [
        "data: open\n\n",
        "data: a\n\ndata: b\n\ndata: c\n\n",
        "data: d\n\n",
        "data: [DONE]\n\n",
    ]


def test_the_opening_goes_out_with_the_first_event_when_it_is_already_there() -> None:
    """The handler waits for the job's first output before the response begins; that
    output and the opening are one write."""

    async def run() -> list[str]:
        sub = Submission("req_2", "t", "default", "m", (1,), SamplingParams(max_tokens=9), 60.0)
        handle = JobHandle(sub, arrival=0.0)
        answer = answer_of(handle)
        answer._pending = Token(TokenChunk(0, "a"))  # read while waiting for first output
        handle.events.put_nowait(Token(TokenChunk(0, "b")))
        handle.events.put_nowait(Done("stop", ""))
        return [chunk async for chunk in answer.sse()]

    assert asyncio.run(run()) == ["data: open\n\ndata: a\n\n", "data: b\n\n", "data: [DONE]\n\n"]


def heartbeat_verdict(event: str, heartbeat: float = 60.0) -> tuple[bool, bool]:
    """What `heartbeat_due` says when `event` comes first, and whether it left any
    callback on the futures it watched."""

    async def run() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        collecting, gone, started = loop.create_future(), loop.create_future(), loop.create_future()
        if event == "started long ago":
            started.set_result(loop.time() - heartbeat)
        waiting = asyncio.ensure_future(heartbeat_due(collecting, gone, started, heartbeat))
        await asyncio.sleep(0)
        if event == "collected":
            collecting.set_result({})
        elif event == "client left":
            gone.set_result(None)
        elif event == "started":
            started.set_result(loop.time())
        verdict = await waiting
        left = any(f._callbacks for f in (collecting, gone, started))  # type: ignore[attr-defined]
        return verdict, left

    return asyncio.run(run())


def test_a_json_answer_heartbeat_is_due_only_once_the_job_has_run_that_long() -> None:
    assert heartbeat_verdict("collected") == (False, False)
    assert heartbeat_verdict("client left") == (False, False)
    assert heartbeat_verdict("started long ago") == (True, False)
    assert heartbeat_verdict("started", heartbeat=0.01) == (True, False)


def test_first_done_returns_at_the_first_future_or_the_time_limit_leaving_no_callback() -> None:
    async def run() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        loop.call_soon(b.set_result, None)
        await first_done((a, b), None)  # returns: b is done
        by_b = b.done() and not a.done()
        await first_done((a,), 0.01)  # returns: the time limit, a still pending
        timed_out = not a.done()
        left = any(f._callbacks for f in (a, b))  # type: ignore[attr-defined]
        return by_b, timed_out, left

    assert asyncio.run(run()) == (True, True, False)
