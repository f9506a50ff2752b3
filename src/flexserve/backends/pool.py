"""A model's pool: several backends seen by the runtime as one, with routing and failover.

The scheduler sees the pool's slots (the sum of its members'); each started job goes to
the least-loaded healthy member (own in-flight share, plus the engine's metrics where an
upstream exposes them). A member that failed a job is avoided for that job's retry or
resume when another is healthy, and members whose circuit breaker is open get nothing.
A resumed job may land on another member: its chunks so far carry the partial answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence

from cachetools import TTLCache

from flexserve.backends.base import (
    Backend,
    BackendError,
    BackendStats,
    ChatMessage,
    Chunk,
    CountsPrompts,
    GenerationRequest,
    NoBackendAvailable,
    TokenChunk,
)
from flexserve.backends.upstream.breaker import CircuitBreaker

FAILED_MEMBER_MEMORY = 600.0
"""Seconds a job remembers which member failed it (its retry goes elsewhere)."""


class Pool:
    name = "pool"

    def __init__(
        self, model: str, members: Sequence[Backend], clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not members:
            raise ValueError("a pool needs at least one backend")
        self.model = model
        self.members = tuple(members)
        self.slots = sum(member.slots for member in members)
        self.context_length = min(member.context_length for member in members)
        self.can_pause = all(member.can_pause for member in members)
        self.estimates_tokens = all(member.estimates_tokens for member in members)
        # a job may run on any member: what one cannot honour, the pool cannot promise
        self.unsupported_sampling = frozenset().union(*(m.unsupported_sampling for m in members))
        self._clock = clock
        self._in_flight = dict.fromkeys(range(len(members)), 0)
        self._failed: TTLCache[str, int] = TTLCache(maxsize=100_000, ttl=FAILED_MEMBER_MEMORY)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        return self.members[0].encode_chat(messages)

    def encode_text(self, text: str) -> tuple[int, ...]:
        return self.members[0].encode_text(text)

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        index = self.choose(request.request_id)
        self._in_flight[index] += 1
        chunks = self.members[index].generate(request, resume)
        try:
            async for chunk in chunks:
                yield chunk
        except BackendError:
            self._failed[request.request_id] = index
            raise
        finally:
            self._in_flight[index] -= 1
            # a pause closes the member's stream now, not when the garbage collector
            # finalizes it (an upstream's HTTP stream, its breaker's probe)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def engine_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Counted by the first healthy member that can say (they serve one model)."""
        for member in self.members:
            if isinstance(member, CountsPrompts) and member.health():
                counted = await member.engine_prompt_tokens(request)
                if counted is not None:
                    return counted
        return None

    def choose(self, request_id: str) -> int:
        """The least-loaded healthy member, not the one that last failed this job if
        another is healthy. No healthy member: BackendError (the job is requeued)."""
        healthy = [i for i, member in enumerate(self.members) if member.health()]
        if not healthy:
            raise NoBackendAvailable(
                f"no healthy backend for model {self.model}", retry_in=self._next_probe()
            )
        failed = self._failed.pop(request_id, None)
        if failed in healthy and len(healthy) > 1:
            healthy.remove(failed)
        return min(healthy, key=self._load)

    def _next_probe(self) -> float:
        """Seconds until some member may be probed again (its breaker's cooldown)."""
        now = self._clock()
        breakers = [getattr(member, "breaker", None) for member in self.members]
        waits = [b.remaining(now) for b in breakers if isinstance(b, CircuitBreaker)]
        return max(0.5, min(waits, default=1.0))

    def _load(self, index: int) -> float:
        member = self.members[index]
        engine = getattr(member, "load", None)
        if engine is not None:  # an upstream: its own in-flight count and the engine's load
            score: float = engine(self._clock())
            return score if not math.isinf(score) else 1e9 + self._in_flight[index]
        return self._in_flight[index] / member.slots

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def close(self) -> None:
        for member in self.members:
            await member.close()

    def available_slots(self) -> int:
        """Slots of the members that take work now: with one of two engines out, the
        scheduler must not fill the other with twice its jobs (interactive work would
        queue inside that engine, behind flex, where flexserve cannot preempt it)."""
        healthy = sum(member.slots for member in self.members if member.health())
        return healthy or self.slots  # none: jobs wait out the outage in their slots

    def health(self) -> bool:
        return any(member.health() for member in self.members)

    def stats(self) -> BackendStats:
        total = BackendStats()
        for member in self.members:
            stats = member.stats()
            total.busy_slot_seconds += stats.busy_slot_seconds
            total.prefilled_tokens += stats.prefilled_tokens
            total.sampled_tokens += stats.sampled_tokens
            total.active_sequences += stats.active_sequences
        return total


def members(backend: Backend) -> tuple[Backend, ...]:
    """The backends behind `backend`: a pool's members, or itself."""
    return backend.members if isinstance(backend, Pool) else (backend,)
