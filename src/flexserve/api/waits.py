"""Waits of a request's handler for the first of several futures, cheaply.

`asyncio.wait(..., return_when=FIRST_COMPLETED)` builds sets, a counter and callbacks on
every call; a handler waits like this a few times per request, and those calls were a few
per cent of a short request's instructions (bench/instructions.py). Here: one future,
woken by done-callbacks (and a timer), every callback removed on the way out, also when
the wait itself is cancelled.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any


async def heartbeat_due(
    collecting: asyncio.Future[Any],
    gone: asyncio.Future[None],
    started: asyncio.Future[float],
    heartbeat: float,
) -> bool:
    """True once the job has run for `heartbeat` seconds; False as soon as the answer is
    collected or the client left, if that comes first.

    One future, woken by callbacks and one timer set when the job starts: `asyncio.wait`
    (twice per request, with its sets and bookkeeping) was 3 % of a short request's
    instructions (bench/instructions.py)."""
    loop = asyncio.get_running_loop()
    wake: asyncio.Future[None] = loop.create_future()
    timer: asyncio.TimerHandle | None = None

    def ring(_: object = None) -> None:
        if not wake.done():
            wake.set_result(None)

    def on_start(_: object = None) -> None:
        nonlocal timer
        if wake.done():  # scheduled in the turn that ended the wait: nobody waits
            return
        if not started.cancelled() and math.isfinite(heartbeat):
            timer = loop.call_at(started.result() + heartbeat, ring)

    watched = (collecting, gone)
    for future in watched:
        future.add_done_callback(ring)
    if started.done():
        on_start()
    else:
        started.add_done_callback(on_start)
    try:
        await wake
    finally:
        for future in watched:
            future.remove_done_callback(ring)
        started.remove_done_callback(on_start)
        if timer is not None:
            timer.cancel()
    return not (collecting.done() or gone.done())


async def first_done(futures: tuple[asyncio.Future[Any], ...], within: float | None) -> None:
    """Returns once one of `futures` is done, or after `within` seconds (None: no limit):
    `asyncio.wait(..., return_when=FIRST_COMPLETED)` without its sets and bookkeeping."""
    loop = asyncio.get_running_loop()
    wake: asyncio.Future[None] = loop.create_future()

    def ring(_: object = None) -> None:
        if not wake.done():
            wake.set_result(None)

    for future in futures:
        future.add_done_callback(ring)
    timer = loop.call_later(within, ring) if within is not None else None
    try:
        await wake
    finally:
        for future in futures:
            future.remove_done_callback(ring)
        if timer is not None:
            timer.cancel()
