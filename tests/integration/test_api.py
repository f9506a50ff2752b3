"""The real server on a loopback port, called with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, RunningServer

MODEL = "smollm2-135m"
Serve = Callable[..., RunningServer]
FAULTS = {"ttft_ms": 5, "tpot_ms": 2, "natural_output_tokens": 12, "fault_markers": True}
"""The test settings' simulated engine, with in-prompt fault markers on."""


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Closed at the end of each test: a client left to the garbage collector leaves an
    unclosed socket, a ResourceWarning (an error here) in whichever test is running."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(server: RunningServer, key: str = KEY) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=30)
    _CLIENTS.append(c)
    return c


def ask(c: openai.OpenAI, content: str = "hello there", **kwargs: object) -> object:
    return c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def hold_the_slot(c: openai.OpenAI, tier: str = "flex") -> openai.Stream[object]:
    """A stream that has started, so it holds a slot until closed."""
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hold"}],
        stream=True,
        service_tier=tier,  # type: ignore[arg-type]
    )
    next(iter(stream))
    return stream  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("asked", "used"),
    [("default", "default"), ("flex", "flex"), ("priority", "priority"), ("auto", "default")],
)
def test_response_reports_the_tier_actually_used(serve: Serve, asked: str, used: str) -> None:
    server = serve()
    reply = ask(client(server), service_tier=asked, max_tokens=5)
    assert reply.service_tier == used  # type: ignore[attr-defined]
    assert reply.usage.completion_tokens == 5  # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == "length"  # type: ignore[attr-defined]


def test_stream_ends_with_usage_chunk_and_same_text_as_non_streaming(serve: Serve) -> None:
    server = serve()
    c = client(server)
    whole = ask(c, service_tier="flex")
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        service_tier="flex",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content  # type: ignore[attr-defined]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[attr-defined]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert {ch.service_tier for ch in chunks} == {"flex"}


def test_async_client_streams(serve: Serve) -> None:
    server = serve()

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "async please"}],
                stream=True,
                service_tier="priority",
            )
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            whole = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "async please"}]
            )
            return "".join(parts), whole.choices[0].message.content or ""

    streamed, whole = asyncio.run(run())
    assert streamed == whole and len(streamed.split()) == 12


def test_wrong_key_is_authentication_error(serve: Serve) -> None:
    server = serve()
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(client(server, key="fs-wrong"))
    assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"service_tier": "scale"}, openai.BadRequestError, "service_tier"),
        ({"model": "gpt-9"}, openai.NotFoundError, "model"),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"temperature": 3.0}, openai.BadRequestError, "temperature"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            openai.BadRequestError,
            "tools",
        ),
        ({"extra_body": {"frobnicate": 1}}, openai.BadRequestError, "frobnicate"),
    ],
)
def test_bad_parameters_get_a_4xx_naming_the_param(
    serve: Serve, kwargs: dict[str, object], error: type[Exception], param: str
) -> None:
    server = serve()
    args: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    args.update(kwargs)
    with pytest.raises(error) as caught:
        client(server).chat.completions.create(**args)  # type: ignore[call-overload]
    assert caught.value.body["param"] == param  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b'{"model": "smollm2-135m"}', "messages"),
        (b'{"model": "smollm2-135m", "messages": []}', "messages"),
        (b'{"model": "smollm2-135m", "messages": "hi"}', "messages"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": 5}]}', None),
        (
            b'{"model": "smollm2-135m", "messages": [{"role": "user"}], "max_tokens": "9"}',
            "max_tokens",
        ),
        (b"[1, 2]", None),
    ],
)
def test_malformed_bodies_are_400_never_500(serve: Serve, body: bytes, param: str | None) -> None:
    server = serve()
    response = httpx.post(
        server.url + "/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"].startswith("req_")


def test_oversized_body_is_413(serve: Serve) -> None:
    server = serve(max_body_bytes=2_000)
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client(server), content="word " * 1_000)
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


def test_unknown_route_is_openai_shaped_404(serve: Serve) -> None:
    server = serve()
    response = httpx.get(server.url + "/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_models_lists_the_backend(serve: Serve) -> None:
    server = serve()
    models = client(server).models.list().data
    assert [m.id for m in models] == [MODEL]
    backends = models[0].backends  # type: ignore[attr-defined]
    assert [(b["kind"], b["healthy"]) for b in backends] == [("simulated", True)]
    assert models[0].service_tiers == ["priority", "default", "flex", "batch"]  # type: ignore[attr-defined]


def test_flex_shed_is_rate_limit_error_with_retry_after_and_not_billed(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 40})
    c = client(server)
    holder = hold_the_slot(c)  # the only slot is now held by this flex stream
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c, content="no room", service_tier="flex", extra_headers={"X-Flex-Max-Wait": "0"})
    error = caught.value
    assert error.code == "resource_unavailable"
    assert int(error.response.headers["retry-after"]) >= 1
    shed_id = error.response.headers["x-request-id"]
    holder.close()
    rows = server.state.store.ledger("tenant-a")
    assert shed_id not in {row.request_id for row in rows}


def test_flex_stream_preempted_by_default_resumes_with_identical_text(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 30})
    c = client(server)
    prompt = "write something long please"
    reference = ask(c, content=prompt, service_tier="flex").choices[0].message.content  # type: ignore[attr-defined]

    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        service_tier="flex",
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    parts = [next(chunks).choices[0].delta.content or "" for _ in range(4)]
    interactive: list[object] = []
    thread = threading.Thread(
        target=lambda: interactive.append(ask(c, content="urgent", service_tier="default"))
    )
    thread.start()
    thread.join(timeout=30)
    assert interactive and interactive[0].service_tier == "default"  # type: ignore[attr-defined]
    rest = list(chunks)
    parts += [ch.choices[0].delta.content or "" for ch in rest if ch.choices]
    assert "".join(parts) == reference
    assert rest[-1].usage.completion_tokens == 30  # type: ignore[union-attr]

    flex_rows = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    preempted = [r for r in flex_rows if r.preemptions > 0]
    assert len(preempted) == 1
    assert preempted[0].output_tokens == 30  # each output token billed once
    assert preempted[0].input_tokens == flex_rows[0].input_tokens


def test_ledger_bills_flex_at_half_and_usage_is_per_tenant(serve: Serve) -> None:
    server = serve()
    ask(client(server), service_tier="default", max_tokens=8)
    ask(client(server), service_tier="flex", max_tokens=8)
    ask(client(server, OTHER_KEY), service_tier="priority", max_tokens=8)
    rows = {r.tier: r for r in server.state.store.ledger("tenant-a")}
    assert set(rows) == {"default", "flex"}
    assert rows["flex"].cost_nanos * 2 == rows["default"].cost_nanos
    assert rows["flex"].list_cost_nanos == rows["default"].cost_nanos
    usage = httpx.get(server.url + "/usage", headers={"authorization": f"Bearer {KEY}"}).json()
    assert usage["tenant"] == "tenant-a" and set(usage["tiers"]) == {"default", "flex"}
    assert usage["flex_savings_nanos"] == rows["flex"].cost_nanos
    other = httpx.get(server.url + "/usage", headers={"authorization": f"Bearer {OTHER_KEY}"})
    assert set(other.json()["tiers"]) == {"priority"}


def test_client_disconnect_frees_the_slot_and_bills_what_was_produced(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 30, "natural_output_tokens": 200})
    c = client(server)
    with c.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        service_tier="flex",
    ) as response:
        request_id = response.headers["x-request-id"]
        data_lines = (line for line in response.iter_lines() if line.startswith("data: {"))
        for _ in range(4):  # the role chunk, then three tokens
            next(data_lines)
    runtime = server.state.fleet.first.runtime
    server.wait_until(lambda: not runtime.scheduler.running_ids())
    rows = server.state.store.ledger
    server.wait_until(lambda: any(r.request_id == request_id for r in rows("tenant-a")))
    row = next(r for r in rows("tenant-a") if r.request_id == request_id)
    assert row.outcome == "cancelled"
    assert 3 <= row.output_tokens < 200


def test_engine_failure_mid_stream_ends_that_stream_with_an_error_only(serve: Serve) -> None:
    server = serve(simulated=FAULTS)
    c = client(server)
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "break [sim:error@3]"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert len([p for p in received if p]) == 3
    assert "engine" in str(caught.value.message)
    assert ask(c, max_tokens=3).usage.completion_tokens == 3  # type: ignore[attr-defined]


def test_engine_failure_before_any_token_fails_cleanly_and_is_not_billed(serve: Serve) -> None:
    server = serve(simulated=FAULTS)
    c = client(server)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(c, content="fails at once [sim:error@0]", service_tier="flex")
    assert caught.value.code == "engine_error"
    failed_id = caught.value.response.headers["x-request-id"]
    assert ask(c, max_tokens=2).usage.completion_tokens == 2  # type: ignore[attr-defined]
    billed = {r.request_id for r in server.state.store.ledger("tenant-a")}
    assert failed_id not in billed and len(billed) == 1


def test_paused_stream_gets_sse_comments_then_continues_without_duplicates(serve: Serve) -> None:
    server = serve(
        slots=1,
        paused_heartbeat=0.01,
        simulated={"ttft_ms": 5, "tpot_ms": 10, "natural_output_tokens": 80},
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "pause me"}],
        "stream": True,
        "service_tier": "flex",
    }
    headers = {"authorization": f"Bearer {KEY}"}
    reference = ask(client(server), content="pause me", service_tier="flex")
    lines: list[str] = []
    with httpx.stream("POST", server.url + "/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        stream = r.iter_lines()
        while len([x for x in lines if '"content":"' in x]) < 3:
            lines.append(next(stream))
        # a long default request takes the only slot for a while
        blocker = threading.Thread(
            target=lambda: ask(client(server), content="block", max_tokens=20)
        )
        blocker.start()
        lines.extend(stream)
        blocker.join(timeout=30)
    assert ": paused" in lines
    payloads = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads)
    assert text == reference.choices[0].message.content  # type: ignore[attr-defined]
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"


def test_a_hung_engine_ends_the_stream_with_an_error_not_a_hang(serve: Serve) -> None:
    server = serve(stall_timeout=0.3, simulated=FAULTS)
    stream = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stall [sim:hang@2]"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 2
    assert "no token" in str(caught.value.message)
    server.wait_until(lambda: not server.state.fleet.first.runtime.scheduler.running_ids())


def test_interactive_queue_past_its_bound_is_503_overloaded_with_retry_after(
    serve: Serve,
) -> None:
    server = serve(
        slots=1,
        scheduler={"interactive_max_wait": 0.05},
        simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 200},
    )
    c = client(server)
    holder = hold_the_slot(c, "default")  # nothing to preempt
    with pytest.raises(openai.InternalServerError) as caught:
        ask(c, content="waits too long")
    assert caught.value.status_code == 503
    assert caught.value.code == "overloaded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    holder.close()


def test_streaming_flex_shed_is_a_real_429_not_a_broken_stream(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 40})
    c = client(server)
    holder = hold_the_slot(c)
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "no room"}],
            stream=True,
            service_tier="flex",
            extra_headers={"X-Flex-Max-Wait": "0"},
        )
    assert caught.value.code == "resource_unavailable"
    holder.close()


def test_quote_predicts_what_admission_will_say(serve: Serve) -> None:
    server = serve(
        slots=1,
        scheduler={"flex_max_wait": 0.5, "cold_start_tokens_per_slot_second": 10},
        simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 100},
    )
    headers = {"authorization": f"Bearer {KEY}"}
    quote_url = server.url + "/flex/quote?prompt_tokens=20&max_tokens=50"
    idle = httpx.get(quote_url, headers=headers).json()
    assert idle["flex_admitted"] and idle["tiers"]["flex"]["predicted_wait_seconds"] == 0.0
    assert idle["tiers"]["flex"]["max_cost_usd"] * 2 == idle["tiers"]["default"]["max_cost_usd"]
    c = client(server)
    holder = hold_the_slot(c)  # 100 tokens at 10 tokens/s ahead: far past the 0.5 s deadline
    busy = httpx.get(quote_url, headers=headers).json()
    assert not busy["flex_admitted"]
    retry = busy["tiers"]["flex"]["retry_after_seconds"]
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c, content="then try", service_tier="flex", max_tokens=50)
    assert float(caught.value.response.headers["retry-after-ms"]) / 1000 == pytest.approx(
        retry, abs=1.0
    )
    assert busy["tiers"]["default"]["predicted_wait_seconds"] == 0.0  # it would preempt
    holder.close()
    bad = httpx.get(server.url + "/flex/quote?prompt_tokens=inf", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_tokens"


def test_a_partial_price_table_keeps_the_default_multipliers(serve: Serve) -> None:
    server = serve(prices={MODEL: {"input": 1.0, "output": 2.0, "multipliers": {"flex": 0.3}}})
    reply = ask(client(server), service_tier="priority", max_tokens=4)
    assert reply.usage.completion_tokens == 4  # type: ignore[attr-defined]
    ask(client(server), service_tier="flex", max_tokens=4)
    rows = {r.tier: r for r in server.state.store.ledger("tenant-a")}
    prompt = rows["flex"].input_tokens
    assert rows["priority"].cost_nanos == round((prompt * 1.0 + 4 * 2.0) * 2.0 * 1000)
    assert rows["flex"].cost_nanos == round((prompt * 1.0 + 4 * 2.0) * 0.3 * 1000)


def test_a_stream_whose_first_token_comes_after_the_heartbeat_loses_nothing(
    serve: Serve,
) -> None:
    """Headers go out at most `paused_heartbeat` after the job starts; the event being
    awaited then must not be lost (before: the first token vanished, or the stream hung
    when it was the end)."""
    server = serve(paused_heartbeat=0.3, simulated={"ttft_ms": 900, "tpot_ms": 2})
    c = client(server)
    reference = ask(c, content="slow start", max_tokens=5).choices[0].message.content  # type: ignore[attr-defined]
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "slow start"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reference
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
