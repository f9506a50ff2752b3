"""The flex client's branches, against a scripted transport under the real `openai` SDK
(httpx2.MockTransport, the SDK's HTTP library), with injected sleep and clock.

The same paths against the real server: tests/integration/test_flex_client.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx2
import openai
import pytest

from flexserve.client import (
    AsyncFlexClient,
    FlexClient,
    FlexPolicy,
    FlexUnavailableError,
    TierPrice,
)
from flexserve.client.policy import Refusal, Trail, retry_after_seconds

MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}


def completion(tier: str | None = "flex", usage: dict[str, Any] = USAGE) -> httpx2.Response:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "service_tier": tier,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": usage,
    }
    return httpx2.Response(200, json=body)


def refusal(
    headers: dict[str, str] | None = None, code: str = "resource_unavailable"
) -> httpx2.Response:
    body = {"error": {"message": "no room", "type": "rate_limit_error", "code": code}}
    return httpx2.Response(429, json=body, headers=headers or {})


def quote(per_million: dict[str, float]) -> httpx2.Response:
    tiers = {tier: {"max_cost_usd": cost} for tier, cost in per_million.items()}
    return httpx2.Response(200, json={"object": "flex.quote", "tiers": tiers})


class Script:
    """Answers chat requests in order from a list; quotes from a function. Records all."""

    def __init__(
        self,
        chats: list[httpx2.Response],
        quotes: Callable[[httpx2.Request], httpx2.Response] | None = None,
    ) -> None:
        self.answers = chats
        self.quotes = quotes or (lambda _: httpx2.Response(404, json={"error": {"message": "?"}}))
        self.sent: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(request)
        if request.url.path.endswith("/flex/quote"):
            return self.quotes(request)
        return self.answers.pop(0)

    def chats(self) -> list[httpx2.Request]:
        return [r for r in self.sent if r.url.path.endswith("/chat/completions")]

    def quotes_asked(self) -> int:
        return len([r for r in self.sent if r.url.path.endswith("/flex/quote")])

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.chats()]

    def sdk(self) -> openai.OpenAI:
        http = httpx2.Client(transport=httpx2.MockTransport(self))
        return openai.OpenAI(api_key="k", base_url="http://flex.test/v1", http_client=http)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def client(self, sdk: openai.OpenAI, policy: FlexPolicy, **kwargs: Any) -> FlexClient:
        return FlexClient(sdk, policy, sleep=self.sleep, clock=self.clock, **kwargs)


def test_refusals_are_waited_out_by_their_retry_after_then_flex_serves() -> None:
    script = Script(
        [refusal({"retry-after": "2"}), refusal({"retry-after-ms": "3500"}), completion()]
    )
    time = FakeTime()
    policy = FlexPolicy(wait_budget=10, max_wait_header=30, timeout=1200)
    result = time.client(script.sdk(), policy).chat(model="m", messages=MESSAGES)
    assert time.slept == [2.0, 3.5]
    assert (result.tier, result.attempts, result.waited_seconds, result.fell_back) == (
        "flex",
        3,
        5.5,
        False,
    )
    chats = script.chats()
    assert len(chats) == 3  # the SDK's own retries are off: every attempt is the policy's
    assert [b["service_tier"] for b in script.bodies()] == ["flex"] * 3
    assert {r.headers["x-flex-max-wait"] for r in chats} == {"30"}
    assert {r.extensions["timeout"]["read"] for r in chats} == {1200}


def test_a_wait_that_would_end_past_the_budget_falls_back_at_once_to_default() -> None:
    script = Script(
        [refusal({"retry-after": "4"}), refusal({"retry-after": "7"}), completion("default")]
    )
    time = FakeTime()
    policy = FlexPolicy(wait_budget=10, max_wait_header=0)
    result = time.client(script.sdk(), policy).chat(model="m", messages=MESSAGES)
    assert time.slept == [4.0]  # 4 + 7 > 10: no sleeping into the budget's end
    assert (result.tier, result.attempts, result.fell_back) == ("default", 3, True)
    assert [b["service_tier"] for b in script.bodies()] == ["flex", "flex", "default"]
    assert "x-flex-max-wait" not in script.chats()[-1].headers


def test_fallback_raise_carries_the_retry_after_and_chains_the_refusal() -> None:
    script = Script([refusal({"retry-after": "60", "x-should-retry": "false"})])
    policy = FlexPolicy(wait_budget=30, fallback="raise")
    with pytest.raises(FlexUnavailableError) as caught:
        FakeTime().client(script.sdk(), policy).chat(model="m", messages=MESSAGES)
    error = caught.value
    assert (error.retry_after, error.attempts, error.waited_seconds) == (60.0, 1, 0.0)
    assert isinstance(error.__cause__, openai.RateLimitError) and error.__cause__ is error.error
    assert "Retry-After 60 s" in str(error)


def test_x_should_retry_false_does_not_stop_a_wait_the_budget_covers() -> None:
    script = Script([refusal({"retry-after": "120", "x-should-retry": "false"}), completion()])
    time = FakeTime()
    result = time.client(script.sdk(), FlexPolicy(wait_budget=900)).chat(
        model="m", messages=MESSAGES
    )
    assert time.slept == [120.0] and result.tier == "flex"


def test_refusals_without_retry_after_back_off_exponentially_to_a_cap() -> None:
    script = Script([refusal()] * 5 + [completion()])
    time = FakeTime()
    policy = FlexPolicy(wait_budget=100, backoff_initial=2, backoff_max=10)
    time.client(script.sdk(), policy).chat(model="m", messages=MESSAGES)
    assert time.slept == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_other_errors_are_raised_as_the_sdk_raised_them_without_retry() -> None:
    for response, kind in [
        (refusal({"retry-after": "1"}, code="rate_limit_exceeded"), openai.RateLimitError),
        (httpx2.Response(400, json={"error": {"message": "bad"}}), openai.BadRequestError),
        (httpx2.Response(503, json={"error": {"message": "down"}}), openai.InternalServerError),
    ]:
        script = Script([response])
        time = FakeTime()
        with pytest.raises(kind):
            time.client(script.sdk(), FlexPolicy()).chat(model="m", messages=MESSAGES)
        assert len(script.chats()) == 1 and time.slept == []


def test_the_tier_is_chosen_by_the_client_not_the_caller() -> None:
    client = FakeTime().client(Script([]).sdk(), FlexPolicy())
    with pytest.raises(TypeError, match="service_tier"):
        client.chat(model="m", messages=MESSAGES, service_tier="default")
    with pytest.raises(TypeError, match="stream"):
        client.chat(model="m", messages=MESSAGES, stream=True)


def test_cost_from_flexserve_quotes_asked_once_per_model() -> None:
    def quotes(request: httpx2.Request) -> httpx2.Response:
        if request.url.params["prompt_tokens"] == "1000000":
            return quote({"default": 0.10, "flex": 0.05})  # input, USD per 1M tokens
        return quote({"default": 0.40, "flex": 0.20})  # output

    script = Script([completion("flex"), completion("default")], quotes)
    client = FakeTime().client(script.sdk(), FlexPolicy())
    flex = client.chat(model="m", messages=MESSAGES)
    full = client.chat(model="m", messages=MESSAGES)
    assert flex.cost_usd == pytest.approx((1000 * 0.05 + 500 * 0.20) / 1e6)
    assert full.cost_usd == pytest.approx(2 * flex.cost_usd)  # type: ignore[operator]
    assert script.quotes_asked() == 2


def test_without_a_quote_endpoint_the_cost_is_unknown_and_not_asked_again() -> None:
    script = Script([completion("flex"), completion("flex")])  # OpenAI itself: quote is 404
    client = FakeTime().client(script.sdk(), FlexPolicy())
    assert client.chat(model="m", messages=MESSAGES).cost_usd is None
    assert client.chat(model="m", messages=MESSAGES).cost_usd is None
    assert script.quotes_asked() == 1


def test_a_given_price_table_prices_cached_tokens_and_no_quote_is_asked() -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 400}}
    script = Script([completion("flex", usage), completion(None)])
    prices = {"m": {"flex": TierPrice(input=1.0, output=4.0, cached_input=0.5)}}
    client = FakeTime().client(script.sdk(), FlexPolicy(), prices=prices)
    result = client.chat(model="m", messages=MESSAGES)
    assert result.cost_usd == pytest.approx((600 * 1.0 + 400 * 0.5 + 500 * 4.0) / 1e6)
    unreported = client.chat(model="m", messages=MESSAGES)  # a server that ignores tiers
    assert unreported.tier is None and unreported.cost_usd is None
    assert script.quotes_asked() == 0


def test_async_twin_follows_the_same_policy() -> None:
    script = Script(
        [refusal({"retry-after": "3"}), refusal({"retry-after": "30"}), completion("default")]
    )
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> None:
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(script))
        async with openai.AsyncOpenAI(api_key="k", base_url="http://x/v1", http_client=http) as sdk:
            client = AsyncFlexClient(
                sdk, FlexPolicy(wait_budget=20), sleep=sleep, clock=lambda: 0.0
            )
            result = await client.chat(model="m", messages=MESSAGES)
            assert (result.tier, result.attempts, result.fell_back) == ("default", 3, True)
            assert result.waited_seconds == 3.0 and result.cost_usd is None

    asyncio.run(run())
    assert slept == [3.0]


def test_retry_after_is_read_from_ms_then_seconds_then_a_date() -> None:
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5
    assert retry_after_seconds({"retry-after": "9"}, now) == 9.0
    assert retry_after_seconds({"retry-after": date}, now) == 30.0
    assert retry_after_seconds({"retry-after": "soon"}, now) is None
    assert retry_after_seconds({"retry-after": "-1"}, now) is None
    assert retry_after_seconds({}, now) is None


def test_a_zero_retry_after_still_waits_the_minimum_delay() -> None:
    policy = FlexPolicy(wait_budget=1, min_delay=0.25)
    trail = Trail(policy, started=0.0)
    refused = Refusal(error=None, retry_after=0.0)  # type: ignore[arg-type]
    assert trail.delay_after(refused, now=0.0) == 0.25
    assert trail.delay_after(refused, now=0.8) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"wait_budget": -1},
        {"timeout": float("inf")},
        {"max_wait_header": float("nan")},
        {"fallback": "flex"},
    ],
)
def test_policy_refuses_nonsense_at_construction(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="FlexPolicy"):
        FlexPolicy(**bad)
