"""What crosses between the engine thread and the rest: jobs in, events and counters out.

A job goes in through the engine's inbox; what the engine produces for it (sampled token
ids, the end, a failure) goes back to the job's asyncio queue. The engine collects a
step's events in an `Outbox` and delivers them with one `call_soon_threadsafe` per event
loop and step, however many sequences that loop serves. `EngineCounters` are what the
engine measures, read from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

from .base import BackendError, BackendStats, Finish, SamplingParams

# What the engine sends to a sequence's queue: a sampled token id, the end, or a failure.
EngineEvent = int | Finish | BackendError


@dataclass(eq=False)
class SequenceJob:
    """One generation handed to the engine: prefill `tokens`, then sample."""

    request_id: str
    tokens: tuple[int, ...]  # prompt + output already produced before a preemption
    history: tuple[int, ...]  # that output alone (fed to the sampler: penalties, min_tokens)
    sampling: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent]
    priority: int = 0  # higher tiers get the prefill budget first
    background: bool = False  # flex/batch: prefilled in small steps (see step_plan)

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.tokens[: len(self.tokens) - len(self.history)]


class Outbox:
    """A step's events, delivered together at the end of the step."""

    def __init__(self) -> None:
        self._pending: list[tuple[SequenceJob, EngineEvent]] = []

    def emit(self, job: SequenceJob, event: EngineEvent) -> None:
        self._pending.append((job, event))

    def flush(self) -> None:
        """One wake-up per event loop, however many sequences it serves."""
        if not self._pending:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceJob, EngineEvent]]] = {}
        for job, event in self._pending:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._pending = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[SequenceJob, EngineEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class EngineCounters:
    """Busy slot-seconds and token counts, written by the engine, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy_slot_seconds = 0.0
        self._prefilled_tokens = 0
        self._sampled_tokens = 0
        self._active_sequences = 0
        self._since = time.monotonic()

    def prefilled(self, tokens: int) -> None:
        with self._lock:
            self._prefilled_tokens += tokens

    def sampled(self) -> None:
        with self._lock:
            self._sampled_tokens += 1

    def set_active(self, sequences: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._busy_slot_seconds += self._active_sequences * (now - self._since)
            self._since = now
            self._active_sequences = sequences

    def snapshot(self, extra: dict[str, float]) -> BackendStats:
        with self._lock:
            ongoing = self._active_sequences * (time.monotonic() - self._since)
            return BackendStats(
                busy_slot_seconds=self._busy_slot_seconds + ongoing,
                prefilled_tokens=self._prefilled_tokens,
                sampled_tokens=self._sampled_tokens,
                active_sequences=self._active_sequences,
                extra=extra,
            )
