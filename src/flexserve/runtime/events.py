"""What a handler receives about its job, in order, through its JobHandle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from flexserve.backends.base import ChatMessage, FinishReason, SamplingParams, TokenChunk
from flexserve.errors import FlexserveError
from flexserve.scheduling.tiers import Tier

log = logging.getLogger("flexserve.runtime")


@dataclass(frozen=True)
class Started:
    """The job holds a slot (first time, or again after a pause)."""

    resumed: bool


@dataclass(frozen=True)
class Token:
    chunk: TokenChunk


@dataclass(frozen=True)
class Paused:
    """Preempted for a higher tier; the job is queued and will resume."""


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    text: str  # held-back text released with the finish


@dataclass(frozen=True)
class Failed:
    """The job ended without an answer: refused (429/503) or the engine failed."""

    error: FlexserveError


JobEvent = Started | Token | Paused | Done | Failed


@dataclass(frozen=True)
class Submission:
    """A validated request, ready for the scheduler."""

    request_id: str
    tenant: str
    tier: Tier
    model: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    max_wait: float
    """Seconds the job may wait to start (flex: deadline; interactive: 503 bound)."""
    stream: bool = False
    """The client receives tokens as they come (SSE), so a cut job has delivered them."""
    messages: tuple[ChatMessage, ...] = ()
    """The chat, for upstream engines that tokenize it themselves."""
    prompt_text: str | None = None
    """A raw prompt (completions API): engines generate after it, with no chat template."""
    billed_by_caller: bool = False
    """The submitter writes the ledger row itself (the batch runner: with the line's
    result, in one transaction), so settling only counts it."""


@dataclass
class JobHandle:
    submission: Submission
    arrival: float
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    produced: list[TokenChunk] = field(default_factory=list)
    started: bool = False
    preemptions: int = 0
    engine_failures: int = 0
    outages: int = 0
    """Times it found no engine to run on (every breaker open) and waited."""
    settled: asyncio.Future[None] | None = None
    """Billing and accounting of the outcome; handlers await it before their last byte."""
    engine_prompt_tokens: int | None = None
    """The prompt's length as an upstream engine counted it (its usage), when it said."""
    listener: Callable[[JobEvent], None] | None = None
    """Takes the events instead of `events`, as they come (`listen`)."""

    def emit(self, event: JobEvent) -> None:
        """The runtime's way to hand the job's submitter its next event."""
        if self.listener is None:
            self.events.put_nowait(event)
            return
        try:
            self.listener(event)
        except Exception:  # the submitter's bug: it must not take the runtime down
            log.exception("event listener failed request_id=%s", self.request_id)

    def listen(self, listener: Callable[[JobEvent], None]) -> None:
        """From now on `listener` takes each event as it is emitted, those already queued
        first: a submitter that only collects the answer needs no task to read it."""
        while not self.events.empty():
            listener(self.events.get_nowait())
        self.listener = listener

    @property
    def prompt_token_count(self) -> int:
        """Input tokens to bill and report: the engine's count where it gave one."""
        if self.engine_prompt_tokens is not None:
            return self.engine_prompt_tokens
        return len(self.submission.prompt_tokens)

    @property
    def request_id(self) -> str:
        return self.submission.request_id


def settled_now() -> asyncio.Future[None]:
    """A `settled` with nothing to wait for (nothing to bill, or billed by its caller)."""
    settled = asyncio.get_running_loop().create_future()
    settled.set_result(None)
    return settled
