"""One streaming call to an upstream, against the recording fake (real HTTP, real SSE)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flexserve.backends.base import BackendError, ChatMessage, EngineRefused, SamplingParams
from flexserve.backends.upstream import (
    StreamEnd,
    TextDelta,
    UpstreamCall,
    build_call,
    stream_call,
)
from flexserve.backends.upstream.prompt_count import prompt_counter
from tests.fakes.upstream import FakeUpstream, serve_app, serve_fake

MESSAGES = (ChatMessage("user", "count"),)


def collect(base_url: str, call: UpstreamCall) -> list[TextDelta | StreamEnd]:
    async def run() -> list[TextDelta | StreamEnd]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            return [item async for item in stream_call(http, base_url, "k", call)]

    return asyncio.run(run())


def test_text_deltas_then_one_end_with_the_upstreams_usage() -> None:
    fake = FakeUpstream(answer="a b c")
    with serve_fake(fake) as url:
        items = collect(
            url, build_call("vllm", model="m", messages=MESSAGES, sampling=SamplingParams(10))
        )
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == "a b c"
    assert items[-1] == StreamEnd("stop", 7, 3)
    path, body = fake.received[0]
    assert path == "/v1/chat/completions" and body["stream_options"] == {"include_usage": True}


def test_calls_one_after_another_reuse_one_connection() -> None:
    """Read to the stream's end (past `[DONE]`): a response left unread closes its
    connection, and every call would pay a new TCP connection."""
    fake = FakeUpstream(answer="a b")
    call = build_call("vllm", model="m", messages=MESSAGES, sampling=SamplingParams(10))

    async def run(url: str) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                assert [item async for item in stream_call(http, url, "k", call)]

    with serve_fake(fake) as url:
        asyncio.run(run(url))
    assert len(fake.client_ports) == 3 and len(set(fake.client_ports)) == 1


def test_resume_continues_after_the_partial_answer_without_repeating_it() -> None:
    fake = FakeUpstream(answer="a b c d")
    call = build_call(
        "vllm", model="m", messages=MESSAGES, sampling=SamplingParams(10), partial="a b", produced=2
    )
    with serve_fake(fake) as url:
        items = collect(url, call)
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == " c d"


def test_openai_flex_429_is_a_refusal_with_its_retry_after_not_a_backend_failure() -> None:
    error = {"error": {"message": "Resource unavailable", "code": "resource_unavailable"}}
    fake = FakeUpstream(refuse=(429, error, {"retry-after": "7"}))
    with serve_fake(fake) as url, pytest.raises(EngineRefused) as refused:
        collect(url, build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4)))
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (
        429,
        "resource_unavailable",
        7.0,
    )


def test_5xx_and_a_stream_cut_midway_are_backend_failures() -> None:
    call = build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4))
    busy = FakeUpstream(refuse=(503, {"error": "busy"}, {}))
    with serve_fake(busy) as url, pytest.raises(BackendError):
        collect(url, call)
    with serve_fake(FakeUpstream(die_after=1)) as url, pytest.raises(BackendError):
        collect(url, call)


def test_a_refused_connection_is_a_backend_failure() -> None:
    call = build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4))
    with pytest.raises(BackendError):
        collect("http://127.0.0.1:9/v1", call)


def test_a_refusals_retry_after_ms_is_kept_to_the_millisecond() -> None:
    # OpenAI and flexserve send both; Retry-After alone is rounded up to whole seconds, and
    # the SDK waits by retry-after-ms first, so passing on only the rounded one waits longer.
    error = {"error": {"message": "Flex capacity", "code": "resource_unavailable"}}
    fake = FakeUpstream(refuse=(429, error, {"retry-after": "3", "retry-after-ms": "2400"}))
    with serve_fake(fake) as url, pytest.raises(EngineRefused) as refused:
        collect(url, build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4)))
    assert refused.value.retry_after == 2.4


def test_a_retry_after_that_is_not_a_finite_number_of_seconds_is_ignored() -> None:
    error = {"error": {"message": "Flex capacity", "code": "resource_unavailable"}}
    fake = FakeUpstream(refuse=(429, error, {"retry-after": "inf", "retry-after-ms": "nan"}))
    with serve_fake(fake) as url, pytest.raises(EngineRefused) as refused:
        collect(url, build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4)))
    assert refused.value.retry_after is None


def test_a_prompt_count_that_is_redirected_is_not_followed() -> None:
    """The count call sends the rendered prompt: a redirect must not carry it elsewhere
    (the count is then unknown, and the estimate billed)."""
    received: list[str] = []

    async def record(request: Request) -> Response:
        received.append(request.url.path)
        return JSONResponse({"count": 3})

    elsewhere = Starlette(routes=[Route("/{path:path}", record, methods=["POST"])])
    with serve_app(elsewhere, "elsewhere") as other_url:

        async def redirect(request: Request) -> Response:
            return Response(status_code=307, headers={"location": other_url + "/count"})

        redirecting = Starlette(routes=[Route("/{path:path}", redirect, methods=["POST"])])
        with serve_app(redirecting, "redirecting") as url:
            count = prompt_counter("llama-cpp-python", url, None, "m", render=lambda m: "text")
            assert count is not None

            async def run() -> int | None:
                async with aiohttp.ClientSession() as http:
                    return await count(http, MESSAGES, None)

            assert asyncio.run(run()) is None
    assert received == []


def test_vllm_names_each_chunks_tokens_even_while_it_holds_their_text() -> None:
    """With `return_token_ids`, a chunk whose text vLLM holds back (a possible stop
    string) still names its token: it is a token, with no text yet."""
    events = [
        {"choices": [{"index": 0, "text": "", "token_ids": [7]}]},
        {"choices": [{"index": 0, "text": "hi", "token_ids": [8, 9]}]},
        {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}},
    ]
    sse = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"

    async def answer(request: Request) -> Response:
        return Response(sse, media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", answer, methods=["POST"])])
    with serve_app(app, "vllm-like") as url:
        call = UpstreamCall("/completions", {"prompt": [1, 2], "return_token_ids": True})
        items = collect(url, call)
    assert items == [TextDelta("", (7,)), TextDelta("hi", (8, 9)), StreamEnd("stop", 4, 3)]
