"""A model's pool: least-loaded healthy routing, failover away from the member that
failed a job, and the engine's own load (stale = saturated). Fake members, fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from flexserve.backends.base import (
    BackendError,
    BackendStats,
    ChatMessage,
    Chunk,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from flexserve.backends.pool import Pool
from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend
from flexserve.backends.upstream.engine_load import EngineLoad


@dataclass
class Member:
    name: str = "simulated"
    model: str = "m"
    slots: int = 2
    context_length: int = 100
    can_pause: bool = True
    estimates_tokens: bool = True
    unsupported_sampling: frozenset[str] = frozenset()
    healthy: bool = True
    fail: bool = False
    calls: list[str] = field(default_factory=list)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        return (1, 2, 3)

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        self.calls.append(request.request_id)
        if self.fail:
            raise BackendError("down")
        yield TokenChunk(7, "x")
        yield Finish("stop")

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> bool:
        return self.healthy

    def stats(self) -> BackendStats:
        return BackendStats()


def request(request_id: str) -> GenerationRequest:
    return GenerationRequest(request_id, (1,), SamplingParams(4))


async def drain(pool: Pool, request_id: str) -> list[Chunk]:
    return [chunk async for chunk in pool.generate(request(request_id))]


def test_jobs_go_to_the_least_loaded_member_by_share_of_its_slots() -> None:
    small, big = Member(slots=1), Member(slots=4)
    pool = Pool("m", [small, big])
    assert pool.slots == 5 and pool.context_length == 100

    async def run() -> None:
        first = pool.generate(request("a"))
        await anext(first)  # "a" holds a slot on the chosen member
        assert pool.choose("b") == 1  # 1/1 busy vs 0/4: the big one
        await first.aclose()

    asyncio.run(run())
    assert small.calls == ["a"]


def test_an_unhealthy_member_gets_nothing_and_none_healthy_is_a_backend_error() -> None:
    down, up = Member(healthy=False), Member()
    pool = Pool("m", [down, up])
    asyncio.run(drain(pool, "a"))
    assert (down.calls, up.calls) == ([], ["a"])
    up.healthy = False
    assert not pool.health()
    with pytest.raises(BackendError, match="no healthy backend for model m"):
        asyncio.run(drain(pool, "b"))


def test_a_job_that_failed_on_a_member_is_retried_on_another() -> None:
    failing, other = Member(fail=True), Member()
    pool = Pool("m", [failing, other])
    with pytest.raises(BackendError):
        asyncio.run(drain(pool, "job"))
    assert failing.calls == ["job"]
    assert pool.choose("job") == 1  # its retry avoids the member that failed it
    assert pool.choose("job") == 0  # remembered once: later jobs are routed by load


def test_a_pool_pauses_only_if_every_member_can_continue() -> None:
    assert Pool("m", [Member(), Member()]).can_pause
    assert not Pool("m", [Member(), Member(can_pause=False)]).can_pause


def upstream(label: str, now: list[float], metrics: bool = True) -> OpenAIBackend:
    url = "http://127.0.0.1:9/v1"
    endpoint = Endpoint(
        url, None, "m", metrics_url="http://127.0.0.1:9/metrics" if metrics else None
    )
    return OpenAIBackend(
        label, "m", endpoint, 8, Capabilities("vllm", "vllm"), clock=lambda: now[0]
    )


def test_engine_metrics_steer_routing_and_stale_metrics_count_as_saturated() -> None:
    now = [100.0]
    busy, idle = upstream("busy", now), upstream("idle", now)
    busy.engine_load = EngineLoad(running=8, waiting=5, kv_usage=0.95, measured_at=100.0)
    idle.engine_load = EngineLoad(running=1, waiting=0, kv_usage=0.2, measured_at=100.0)
    pool = Pool("m", [busy, idle], clock=lambda: now[0])
    assert pool.choose("a") == 1
    now[0] = 200.0  # neither has reported for 100 s: both saturated, so own counts decide
    idle.in_flight = 3
    assert pool.choose("b") == 0
    idle.engine_load = EngineLoad(running=9, waiting=9, kv_usage=1.0, measured_at=200.0)
    assert pool.choose("c") == 1  # fresh (if high) beats stale


def test_the_pools_capacity_is_its_healthy_members_slots() -> None:
    down, up = Member(slots=4, healthy=False), Member(slots=2)
    pool = Pool("m", [down, up])
    assert (pool.slots, pool.available_slots()) == (6, 2)
    down.healthy = True
    assert pool.available_slots() == 6
    down.healthy = up.healthy = False
    assert pool.available_slots() == 6  # none healthy: jobs wait out the outage in slots


def test_a_pool_estimates_tokens_only_if_every_member_does() -> None:
    """Else validation (which tokenizes) must leave the event loop for its members."""
    assert Pool("m", [Member(), Member()]).estimates_tokens
    assert not Pool("m", [Member(), Member(estimates_tokens=False)]).estimates_tokens
