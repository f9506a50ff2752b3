"""`flexserve.client` against the real server (in-process, simulated engine), one test per
path of the policy: served at once, served after Retry-After, fallback, raise.

The sleep is injected: instead of sleeping, it frees the slot that made flex wait (and
records what the server asked), so no test waits on the wall clock or asserts on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from flexserve.client import (
    AsyncFlexClient,
    FlexClient,
    FlexPolicy,
    FlexUnavailableError,
)
from flexserve.store.records import LedgerRow
from tests.conftest import KEY, RunningServer

MODEL = "smollm2-135m"
Serve = Callable[..., RunningServer]
SLOW = {"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 40}
"""One slot held by a stream of this engine stays held far past a 0 s flex deadline."""
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "summarise the meeting notes"}
]

_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def sdk(server: RunningServer) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
    _CLIENTS.append(c)
    return c


def hold_the_slot(server: RunningServer) -> openai.Stream[object]:
    """A started flex stream: the server's only slot is busy until it is closed."""
    stream = sdk(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hold"}],
        stream=True,
        service_tier="flex",
    )
    next(iter(stream))
    return stream  # type: ignore[return-value]


class FreeTheSlot:
    """An injected sleep: records the wait asked, then frees the slot (no real sleeping);
    the fake clock moves by the wait, as a real one would."""

    def __init__(self, server: RunningServer, holder: openai.Stream[object]) -> None:
        self.server, self.holder = server, holder
        self.now = 1000.0
        self.asked: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.now += seconds
        self.holder.close()
        runtime = self.server.state.fleet.first.runtime
        self.server.wait_until(lambda: not runtime.scheduler.running_ids())


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"the policy should not wait here ({seconds} s asked)")


def stopped_clock() -> float:
    """Where no wait is expected, time stands still: only Retry-After meets the budget."""
    return 0.0


def billed(server: RunningServer, completion_id: str) -> LedgerRow:
    request_id = "req_" + completion_id.removeprefix("chatcmpl-")
    rows = server.state.store.ledger
    server.wait_until(lambda: any(r.request_id == request_id for r in rows("tenant-a")))
    return next(r for r in rows("tenant-a") if r.request_id == request_id)


def test_flex_served_at_once_costs_half_the_default_and_what_was_billed(serve: Serve) -> None:
    server = serve()
    flex = FlexClient(sdk(server), sleep=never_sleep, clock=stopped_clock).chat(
        model=MODEL, messages=MESSAGES, max_tokens=8
    )
    assert (flex.tier, flex.attempts, flex.fell_back, flex.waited_seconds) == ("flex", 1, False, 0)
    row = billed(server, flex.completion.id)
    assert row.tier == "flex"
    assert flex.cost_usd == row.cost_nanos / 1e9  # to the nano-dollar, as billed
    assert flex.cost_usd * 2 == pytest.approx(row.list_cost_nanos / 1e9, abs=1e-12)

    default = sdk(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, service_tier="default"
    )
    assert default.usage == flex.completion.usage  # the same tokens, so twice the price:
    assert billed(server, default.id).cost_nanos == row.list_cost_nanos


def test_refused_flex_waits_the_retry_after_then_is_served_at_flex(serve: Serve) -> None:
    server = serve(slots=1, simulated=SLOW)
    waits = FreeTheSlot(server, hold_the_slot(server))
    policy = FlexPolicy(wait_budget=600, max_wait_header=0)
    flex = FlexClient(sdk(server), policy, sleep=waits.sleep, clock=waits.clock)
    result = flex.chat(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert len(waits.asked) == 1 and waits.asked[0] >= 1  # flexserve asks for >= 1 s
    assert (result.tier, result.attempts, result.fell_back) == ("flex", 2, False)
    assert result.waited_seconds == waits.asked[0]
    assert result.cost_usd == billed(server, result.completion.id).cost_nanos / 1e9


def test_budget_too_short_falls_back_to_default_at_full_price(serve: Serve) -> None:
    server = serve(slots=1, simulated=SLOW)
    holder = hold_the_slot(server)  # a default request preempts it; flex cannot
    policy = FlexPolicy(wait_budget=0.5, max_wait_header=0)
    result = FlexClient(sdk(server), policy, sleep=never_sleep, clock=stopped_clock).chat(
        model=MODEL, messages=MESSAGES, max_tokens=8
    )
    holder.close()
    assert (result.tier, result.attempts, result.fell_back, result.waited_seconds) == (
        "default",
        2,
        True,
        0,
    )
    row = billed(server, result.completion.id)
    assert row.tier == "default" and row.cost_nanos == row.list_cost_nanos
    assert result.cost_usd == row.cost_nanos / 1e9

    def billed_tiers() -> set[str]:
        return {r.tier for r in server.state.store.ledger("tenant-a")}

    server.wait_until(lambda: billed_tiers() == {"flex", "default"})  # the holder, the answer


def test_budget_too_short_with_fallback_raise_raises_with_the_retry_after(serve: Serve) -> None:
    server = serve(slots=1, simulated=SLOW)
    holder = hold_the_slot(server)
    policy = FlexPolicy(wait_budget=0.5, fallback="raise", max_wait_header=0)
    with pytest.raises(FlexUnavailableError) as caught:
        FlexClient(sdk(server), policy, sleep=never_sleep, clock=stopped_clock).chat(
            model=MODEL, messages=MESSAGES, max_tokens=8
        )
    holder.close()
    error = caught.value
    assert isinstance(error.__cause__, openai.RateLimitError)
    assert error.error.code == "resource_unavailable"
    headers = error.error.response.headers
    assert error.retry_after == float(headers["retry-after-ms"]) / 1000
    assert int(headers["retry-after"]) >= 1
    assert (error.attempts, error.waited_seconds) == (1, 0)
    assert "Retry-After" in str(error) and "fallback='raise'" in str(error)
    refused_id = headers["x-request-id"]
    assert refused_id not in {r.request_id for r in server.state.store.ledger("tenant-a")}


def test_stream_refused_then_falls_back_and_reports_tier_and_cost(serve: Serve) -> None:
    server = serve(slots=1, simulated=SLOW)
    holder = hold_the_slot(server)
    policy = FlexPolicy(wait_budget=0, max_wait_header=0)
    with FlexClient(sdk(server), policy, sleep=never_sleep, clock=stopped_clock).stream(
        model=MODEL, messages=MESSAGES, max_tokens=8
    ) as stream:
        chunks = list(stream)
    holder.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and (stream.tier, stream.attempts, stream.fell_back) == ("default", 2, True)
    assert stream.usage is not None and stream.usage.completion_tokens == 8
    row = billed(server, chunks[0].id)
    assert row.tier == "default"
    assert stream.cost_usd == row.cost_nanos / 1e9


def test_async_client_waits_the_retry_after_then_streams_at_flex(serve: Serve) -> None:
    server = serve(slots=1, simulated=SLOW)
    waits = FreeTheSlot(server, hold_the_slot(server))

    async def sleep(seconds: float) -> None:
        await asyncio.to_thread(waits.sleep, seconds)

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0) as sdk:
            policy = FlexPolicy(wait_budget=600, max_wait_header=0)
            flex = AsyncFlexClient(sdk, policy, sleep=sleep, clock=waits.clock)
            refused_first = await flex.chat(model=MODEL, messages=MESSAGES, max_tokens=4)
            assert (refused_first.tier, refused_first.attempts) == ("flex", 2)
            assert waits.asked == [refused_first.waited_seconds]
            assert refused_first.waited_seconds >= 1
            async with await flex.stream(model=MODEL, messages=MESSAGES, max_tokens=4) as s:
                parts = [c.choices[0].delta.content or "" async for c in s if c.choices]
            assert "".join(parts) and (s.tier, s.attempts, s.fell_back) == ("flex", 1, False)
            assert s.cost_usd is not None and s.cost_usd == refused_first.cost_usd

    asyncio.run(run())


def test_the_readme_example_runs_against_the_server(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## A flex-aware client", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    server = serve()
    example = snippet.replace("http://127.0.0.1:8000/v1", server.url).replace("fs-...", KEY)
    namespace: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    namespace["client"].close()
    printed = capsys.readouterr().out.strip()
    promised = snippet.strip().splitlines()[-1].removeprefix("# ")
    assert printed == promised  # the example prints what the README says it prints
