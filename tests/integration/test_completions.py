"""POST /v1/completions through the official client, as eval and load tools call it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, RunningServer
from tests.fakes.upstream import FakeUpstream, serve_fake

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"


def test_a_prompt_is_completed_with_usage_tier_and_billing(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve()
    c = clients(server)
    answer = c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, extra_body={"service_tier": "flex"}
    )
    assert answer.object == "text_completion"
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].text
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens == 4  # the simulated engine: one token a word
    assert (answer.model_extra or {})["service_tier"] == "flex"
    rows = server.state.store.ledger("tenant-a")
    assert [(r.tier, r.input_tokens, r.output_tokens) for r in rows] == [("flex", 4, 5)]


def test_streaming_echo_stop_and_a_one_element_list(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    whole = c.completions.create(model=MODEL, prompt=["The sky is"], max_tokens=6, echo=True)
    text = whole.choices[0].text
    assert text.startswith("The sky is")
    stream = c.completions.create(
        model=MODEL,
        prompt="The sky is",
        max_tokens=6,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    stop_word = text.removeprefix("The sky is").split()[2]
    stopped = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, stop=stop_word)
    assert stopped.choices[0].finish_reason == "stop" and stop_word not in stopped.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"logprobs": 1}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(
    serve: Serve, extra: dict[str, Any], param: str
) -> None:
    server = serve()
    body = {"model": MODEL, "prompt": "hi", **extra}
    answer = httpx.post(
        server.url + "/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_guidellm_and_lm_eval_style_requests(serve: Serve) -> None:
    server = serve()
    headers = {"authorization": f"Bearer {KEY}"}
    guidellm = {  # guidellm: streaming, ignore_eos, usage in the stream
        "model": MODEL,
        "prompt": "word " * 50,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/completions", json=guidellm, headers=headers) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    lm_eval = {  # lm-eval generate_until: stop sequences, temperature 0, seed, logprobs null
        "model": MODEL,
        "prompt": "Question: 2+2?\nAnswer:",
        "max_tokens": 12,
        "temperature": 0,
        "stop": ["\n\n", "Question:"],
        "seed": 1234,
        "logprobs": None,
    }
    answer = httpx.post(server.url + "/completions", json=lm_eval, headers=headers).json()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_flex_completion_is_paused_for_chat_and_resumes_without_duplicates(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 30})
    c = clients(server)
    reference = (
        c.completions.create(
            model=MODEL, prompt="tell a story", max_tokens=30, extra_body={"service_tier": "flex"}
        )
        .choices[0]
        .text
    )
    stream = iter(
        c.completions.create(
            model=MODEL,
            prompt="tell a story",
            max_tokens=30,
            stream=True,
            extra_body={"service_tier": "flex"},
        )
    )
    parts = [next(stream).choices[0].text for _ in range(3)]
    urgent: list[Any] = []
    thread = threading.Thread(
        target=lambda: urgent.append(
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "now"}])
        )
    )
    thread.start()
    thread.join(timeout=30)
    parts += [ch.choices[0].text for ch in stream if ch.choices]
    assert urgent and "".join(parts) == reference
    flex = [r for r in server.state.store.ledger("tenant-a") if r.preemptions]
    assert len(flex) == 1 and flex[0].output_tokens == 30


def test_completions_on_an_upstream_use_its_raw_completions_and_resume_there(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    fake = FakeUpstream(answer="alpha beta gamma delta")
    with serve_fake(fake) as url:
        backend = {"kind": "openai", "base_url": url, "engine": "openai"}
        server = serve(models={"up": {"backends": [backend]}})
        # The fake continues after its `<|assistant|>` marker (where a resume's partial
        # answer would be): a prompt ending there asks for the answer from the start.
        prompt = "Say:<|assistant|>"
        answer = clients(server).completions.create(model="up", prompt=prompt, max_tokens=4)
    assert answer.choices[0].text == "alpha beta gamma delta"
    path, body = fake.received[0]
    assert path == "/v1/completions" and body["prompt"] == prompt
