"""OpenAI strictness where it matters, and clients written for vLLM working unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import KEY, RunningServer

MODEL = "smollm2-135m"
Serve = Callable[..., RunningServer]
AUTH = {"authorization": f"Bearer {KEY}"}


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(server: RunningServer) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
    _CLIENTS.append(c)
    return c


def chat(server: RunningServer, **kwargs: object) -> object:
    return client(server).chat.completions.create(  # type: ignore[call-overload]
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], **kwargs
    )


def post(server: RunningServer, body: dict[str, object]) -> httpx.Response:
    full = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(server.url + "/chat/completions", json=full, headers=AUTH, timeout=30)


# ---- 9: OpenAI strictness -----------------------------------------------------------


def test_fast_tier_runs_as_priority_and_is_echoed_as_sent(serve: Serve) -> None:
    server = serve()
    reply = chat(server, service_tier="fast", max_tokens=3)
    assert reply.service_tier == "fast"  # type: ignore[attr-defined]
    chunks = list(chat(server, service_tier="fast", stream=True))  # type: ignore[call-overload]
    assert {ch.service_tier for ch in chunks} == {"fast"}
    rows = server.state.store.ledger("tenant-a")
    assert [r.tier for r in rows] == ["priority", "priority"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_context_is_context_length_exceeded(serve: Serve, field: str) -> None:
    server = serve()
    context = server.state.fleet.first.backend.context_length
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, **{field: context})
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == field  # type: ignore[index]
    assert chat(server, **{field: 7}).usage.completion_tokens == 7  # type: ignore[attr-defined]


def test_stream_options_without_stream_is_400(serve: Serve) -> None:
    server = serve()
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, stream_options={"include_usage": True})
    assert caught.value.body["param"] == "stream_options"  # type: ignore[index]


def test_sse_is_neither_cached_nor_buffered_by_proxies(serve: Serve) -> None:
    server = serve()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    url = server.url + "/chat/completions"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        response.read()


# ---- 10: clients written for vLLM ---------------------------------------------------


def test_health_at_vllms_path(serve: Serve) -> None:
    server = serve()
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_ignore_eos_runs_to_max_tokens(serve: Serve) -> None:
    server = serve()  # the simulated answer ends by itself after 12 tokens
    reply = chat(server, max_tokens=20, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 20  # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == "length"  # type: ignore[attr-defined]


def test_min_tokens_holds_the_end_back(serve: Serve) -> None:
    server = serve()
    reply = chat(server, extra_body={"min_tokens": 16})
    assert reply.usage.completion_tokens == 16  # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, max_tokens=4, extra_body={"min_tokens": 5})
    assert caught.value.body["param"] == "min_tokens"  # type: ignore[index]


def test_continuous_usage_stats_puts_usage_in_every_chunk(serve: Serve) -> None:
    server = serve()
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(chat(server, stream=True, stream_options=options))  # type: ignore[call-overload]
    assert all(ch.usage is not None for ch in chunks)
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 12
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices]
    with_text = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert [ch.usage.completion_tokens for ch in with_text] == list(range(1, 13))
    assert len([t for t in texts if t]) == 12
    plain = list(chat(server, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    assert [ch.usage is not None for ch in plain].count(True) == 1


def test_vllm_extensions_at_values_that_ask_for_nothing_are_accepted(serve: Serve) -> None:
    server = serve()
    neutral = {
        "top_k": -1,
        "repetition_penalty": 1.0,
        "min_p": 0.0,
        "use_beam_search": False,
        "best_of": 1,
        "length_penalty": 1.0,
        "stop_token_ids": [],
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "include_stop_str_in_output": False,
        "echo": False,
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "min_tokens": 0,
        "ignore_eos": False,
    }
    reply = chat(server, max_tokens=4, extra_body=neutral)
    assert reply.usage.completion_tokens == 4  # type: ignore[attr-defined]
    sampled = chat(server, max_tokens=4, extra_body={"top_k": 40, "repetition_penalty": 1.1})
    assert sampled.usage.completion_tokens == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"min_p": 0.05}, "min_p"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"best_of": 2}, "best_of"),
        ({"stop_token_ids": [2]}, "stop_token_ids"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"echo": True}, "echo"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"guided_choice": ["yes", "no"]}, "guided_choice"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"logits_processors": ["x"]}, "logits_processors"),
    ],
)
def test_vllm_extensions_we_cannot_honour_are_400_naming_the_param(
    serve: Serve, extra: dict[str, object], param: str
) -> None:
    server = serve()
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, extra_body=extra)
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(serve: Serve) -> None:
    server = serve()
    reply = chat(server, max_tokens=2, extra_body={"truncate_prompt_tokens": 5})
    assert reply.usage.prompt_tokens == 5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": "yes"}, "stream"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
            "stream_options.continuous_usage_stats",
        ),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop[1]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"tool_choice": 5}, "tool_choice"),
        ({"metadata": {"k": 5}}, "metadata.k"),
    ],
)
def test_a_400_names_the_full_path_of_the_bad_field(
    serve: Serve, body: dict[str, object], param: str
) -> None:
    response = post(serve(), body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_flex_request_whose_client_left_while_queued_is_counted_and_not_billed(
    serve: Serve,
) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 40})
    c = client(server)
    holder = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hold"}],
        stream=True,
        service_tier="flex",
    )
    next(iter(holder))  # the only slot is held
    body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "service_tier": "flex"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/chat/completions", json=body, headers=AUTH, timeout=0.3)

    def abandoned() -> float:
        text = httpx.get(server.base_url + "/metrics").text
        line = 'flexserve_requests_total{outcome="abandoned",tier="flex"}'
        found = [x for x in text.splitlines() if x.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    server.wait_until(lambda: abandoned() == 1.0)
    holder.close()
    server.wait_until(lambda: len(server.state.store.ledger("tenant-a")) == 1)
    assert len(server.state.store.ledger("tenant-a")) == 1  # only the holder


# ---- 11: integers far out of range ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", "9" * 4300),
        ("seed", "9" * 50_000),  # past what the JSON parser takes as a number at all
        ("temperature", "9" * 5000 + ".5"),
        ("seed", str(2**63)),
        ("max_tokens", "9" * 401),
        ("max_completion_tokens", str(2**31)),
        ("n", "9" * 30),
        ("top_logprobs", "9" * 30),
        ("top_k", "9" * 30),
        ("min_tokens", "9" * 30),
        ("truncate_prompt_tokens", "9" * 30),
        ("best_of", "9" * 30),
    ],
)
def test_integers_far_out_of_range_are_400_naming_the_field(
    serve: Serve, field: str, value: str
) -> None:
    server = serve()
    raw = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x"}}], '
        f'"{field}": {value}}}'
    )
    response = httpx.post(
        server.url + "/chat/completions",
        content=raw.encode(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_a_64_bit_seed_is_accepted(serve: Serve) -> None:
    server = serve()
    response = post(server, {"seed": 2**63 - 1, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["usage"]["completion_tokens"] == 2
