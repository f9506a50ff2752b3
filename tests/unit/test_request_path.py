"""Small pieces of the request path: where validation runs, and request ids."""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace
from typing import Any

from flexserve.api.body import new_request_id
from flexserve.api.validation import run_validation


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
