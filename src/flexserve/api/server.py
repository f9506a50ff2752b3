"""The server process: uvicorn, plus what a supervised service needs from it.

- SIGTERM (or Ctrl-C) drains instead of stopping at once. uvicorn's own handler closes
  the listening socket straight away (new clients get connection errors) and, after
  shutting down, re-raises the signal, so the process ends "killed by SIGTERM" (143).
  Here the first signal starts `Fleet.shutdown` while the server keeps accepting
  (new requests get 503 from `DrainGate`); when the runtime has drained, uvicorn is
  told to exit, and the exit status is 0. A second signal stops waiting.
- If the runtime task dies, the server exits with status 1, so that a supervisor
  restarts it (every waiter has already had its 500).
- Request read deadlines (`read_deadlines`) close stalled half-requests.
- The garbage collector is tuned once started (`tune_garbage_collector`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from flexserve.api.read_deadlines import read_deadline_protocol
from flexserve.api.state import AppState
from flexserve.config import Settings
from flexserve.runtime import Fleet

log = logging.getLogger("flexserve")

FLUSH_SECONDS = 5
"""After the drain: how long uvicorn waits for responses still being written (the last
SSE events) before it cancels them."""

EXIT_RUNTIME_FAILED = 1

GC_THRESHOLDS = (10_000, 50, 1000)
"""Young collections every 10,000 allocations (not 700), full ones 50x1000 times rarer."""


def tune_garbage_collector() -> None:
    """Freeze what start-up built and collect the young generations less often.

    Every open request holds ~200 tracked objects, so a deep flex backlog (1,000+ queued
    requests) makes each full collection walk ~300k objects: a 150-500 ms pause of the
    event loop, i.e. of every interactive stream (bench/RESULTS.md, deep backlog). The
    objects built at start-up (app, model, templates) never die: frozen, no collection
    walks them again; with higher thresholds full collections become rare.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, fleet: Fleet, grace: float) -> None:
        super().__init__(config)
        self.fleet = fleet
        self.grace = grace
        self._drain_asked = False
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags; `on_tick` (on the event loop) acts on them.
        # The signal is not recorded for re-raising (see the module docstring).
        if self._drain_asked:
            log.warning("second signal: stopping without waiting for the drain")
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
        self._drain_asked = True

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        tune_garbage_collector()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_asked and self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit(), name="flexserve-drain")
        if self.fleet.failure is not None:
            self.should_exit = True
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        log.info("draining (grace %.1f s): new requests get 503", self.grace)
        await self.fleet.shutdown(self.grace)
        log.info("drained")
        self.should_exit = True


def build_server(app: FastAPI, settings: Settings, log_level: str) -> DrainingServer:
    state: AppState = app.state.flexserve
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        loop="uvloop",  # its event loop and transports cost a fraction of asyncio's
        http=read_deadline_protocol(settings.header_read_timeout, settings.body_read_timeout),
        timeout_graceful_shutdown=FLUSH_SECONDS,
        # Off when its lines would be dropped anyway: uvicorn works out each line's
        # fields before the logger filters it, on every request.
        access_log=logs_requests(log_level),
    )
    return DrainingServer(config, state.fleet, settings.shutdown_grace)


def logs_requests(log_level: str) -> bool:
    """uvicorn's access log (one line per request) shows at this level."""
    level = logging.getLevelName(log_level.upper())
    return not isinstance(level, int) or level <= logging.INFO


def run_server(app: FastAPI, settings: Settings, log_level: str) -> int:
    """Serve until drained or failed; the process's exit status."""
    server = build_server(app, settings, log_level)
    server.run()
    if server.fleet.failure is not None:
        log.error("exiting: %s", server.fleet.failure)
        return EXIT_RUNTIME_FAILED
    return 0
