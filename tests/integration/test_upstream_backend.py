"""flexserve in front of OpenAI-compatible upstreams, against the recording fake (real HTTP,
real SSE, the official client). The real engine (llama-cpp-python's server) is in
test_real_upstream.py; these cover what the fake shows best: the exact bodies sent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, RunningServer, free_port
from tests.fakes.upstream import PROMPT_IDS, WORD_ID, FakeUpstream, serve_fake

Serve = Callable[..., RunningServer]
ANSWER = "one two three four five six seven eight nine ten eleven twelve"


def upstream(url: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": url, "upstream_model": "fake-model", **fields}


def chat(c: openai.OpenAI, model: str, tier: str, **kwargs: Any) -> Any:
    return c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "count"}],
        service_tier=tier,  # type: ignore[arg-type]
        **kwargs,
    )


def test_tiers_map_to_vllm_lower_first_and_sglang_higher_first(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    fake = FakeUpstream(answer=ANSWER)
    with serve_fake(fake) as url:
        server = serve(
            models={
                "on-vllm": {"backends": [upstream(url, engine="vllm", metrics_url=None)]},
                "on-sglang": {"backends": [upstream(url, engine="sglang")]},
                "on-llamacpp": {
                    "backends": [upstream(url, engine="llamacpp", continuation="llamacpp")]
                },
            }
        )
        c = clients(server)
        for model in ("on-vllm", "on-sglang", "on-llamacpp"):
            for tier in ("priority", "default", "flex", "batch"):
                if tier != "batch":  # the chat API has no batch tier; batch files do
                    chat(c, model, tier, max_tokens=2)
    sent = [body for _, body in fake.received]
    vllm, sglang, llamacpp = sent[0:3], sent[3:6], sent[6:9]
    assert [b["priority"] for b in vllm] == [0, 1, 2]  # lower runs first in vLLM
    assert [b["priority"] for b in sglang] == [3, 2, 1]  # higher runs first in SGLang
    assert all("priority" not in b for b in llamacpp)  # FIFO engine: no field it rejects
    assert all("service_tier" not in b for b in sent)  # only for pass-through upstreams


def test_a_cookie_an_upstream_sets_for_one_tenant_is_never_sent_for_another(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    """The backend's HTTP session is shared by every tenant's requests: it keeps no
    cookies, whatever the upstream (or a load balancer in front of it) sets."""
    fake = FakeUpstream(answer=ANSWER, set_cookie="session=tenant-a-secret; Path=/")
    with serve_fake(fake) as url:
        by_name = url.replace("127.0.0.1", "localhost")  # cookie jars ignore bare IPs
        server = serve(models={"m": {"backends": [upstream(by_name, engine="vllm")]}})
        chat(clients(server), "m", "default", max_tokens=2)
        chat(clients(server, OTHER_KEY), "m", "default", max_tokens=2)
    assert fake.cookies == [None, None]


def test_an_upstream_that_redirects_fails_and_the_prompt_goes_nowhere_else(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    elsewhere = FakeUpstream(answer=ANSWER)
    with serve_fake(elsewhere) as other_url:
        location = {"location": other_url + "/chat/completions"}
        redirecting = FakeUpstream(refuse=(307, {}, location))
        with serve_fake(redirecting) as url:
            server = serve(models={"m": {"backends": [upstream(url, engine="vllm")]}})
            with pytest.raises(openai.InternalServerError) as failed:
                chat(clients(server), "m", "default", max_tokens=2)
    assert "307" in failed.value.message
    assert other_url.split("/v1")[0] not in failed.value.message  # no address to clients
    assert elsewhere.received == []
    assert len(redirecting.received) == 2  # an interactive job is retried once
    assert server.state.store.ledger("tenant-a") == []


def test_openai_upstream_gets_service_tier_and_its_429_becomes_ours_unbilled(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    error = {"error": {"message": "Resource unavailable", "code": "resource_unavailable"}}
    fake = FakeUpstream(refuse=(429, error, {"retry-after": "7"}))
    with serve_fake(fake) as url:
        server = serve(models={"gpt": {"backends": [upstream(url, engine="openai")]}})
        c = clients(server)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as refused:
                response = chat(c, "gpt", "flex", stream=stream)
                if stream:
                    list(response)
            assert refused.value.code == "resource_unavailable"
            assert refused.value.response.headers["retry-after"] == "7"
        fake.refuse = None
        served = chat(c, "gpt", "flex", max_tokens=3)
    assert [body.get("service_tier") for _, body in fake.received] == ["flex"] * 3
    assert served.service_tier == "flex"
    rows = server.state.store.ledger("tenant-a")
    assert len(rows) == 1  # only the answered request is billed
    assert (rows[0].input_tokens, rows[0].output_tokens) == (7, 3)  # the engine's usage


def test_a_model_without_flex_answers_flex_with_400_naming_service_tier(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    server = serve(
        models={
            "interactive-only": {
                "backends": [{"kind": "simulated"}],
                "tiers": ["priority", "default"],
            }
        }
    )
    with pytest.raises(openai.BadRequestError) as refused:
        chat(clients(server), "interactive-only", "flex")
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "service_tier"  # type: ignore[index]
    assert "does not offer service_tier 'flex'" in refused.value.message
    assert chat(clients(server), "interactive-only", "default").service_tier == "default"


def test_models_lists_every_model_with_its_tiers_backends_and_guarantees(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    with serve_fake(FakeUpstream()) as url:
        server = serve(
            models={
                "local": {"backends": [{"kind": "simulated", "slots": 3}]},
                "remote": {
                    "backends": [
                        upstream(url, engine="vllm", name="gpu-a", slots=8, metrics_url=None),
                        upstream(url, engine="openai", name="openai", slots=4),
                    ],
                    "tiers": ["default", "flex"],
                },
            }
        )
        cards = {m.id: m.model_dump() for m in clients(server).models.list().data}
        with pytest.raises(openai.NotFoundError):
            chat(clients(server), "missing", "default")
    assert set(cards) == {"local", "remote"}
    remote = cards["remote"]
    assert remote["service_tiers"] == ["default", "flex"] and remote["slots"] == 12
    assert remote["pauses_mid_answer"] is False  # one member cannot continue: never paused
    gpu, hosted = remote["backends"]
    assert (gpu["name"], gpu["priority_style"], gpu["continuation"]) == ("gpu-a", "vllm", "vllm")
    assert (gpu["state"], gpu["healthy"]) == ("closed", True)
    assert hosted["service_tier_passthrough"] is True and "never paused" in hosted["resume"]
    assert cards["local"]["pauses_mid_answer"] is True and cards["local"]["slots"] == 3


def flex_stream_preempted_by_default(c: openai.OpenAI) -> tuple[list[str], list[Any]]:
    """A flex stream of 12 tokens, with a default request arriving after its third word
    (on a backend of one slot: the flex job is paused for it). What the flex client
    received, and the default answer."""
    chunks = iter(chat(c, "m", "flex", stream=True, max_tokens=12))
    received = [_text(next(chunks)) for _ in range(4)]  # role chunk + 3 words
    urgent: list[Any] = []
    thread = threading.Thread(target=lambda: urgent.append(chat(c, "m", "default")))
    thread.start()
    thread.join(timeout=30)
    received += [_text(chunk) for chunk in chunks]
    return received, urgent


def test_a_paused_upstream_job_resumes_with_the_partial_answer_and_fewer_tokens(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    fake = FakeUpstream(answer=ANSWER, delay=0.05)
    with serve_fake(fake) as url:
        server = serve(models={"m": {"backends": [upstream(url, engine="vllm", slots=1)]}})
        received, urgent = flex_stream_preempted_by_default(clients(server))
    assert urgent and urgent[0].choices[0].message.content == ANSWER
    assert "".join(received) == ANSWER  # one stream: no word twice, none missing
    flex_calls = [body for _, body in fake.received if body["priority"] == 2]
    first, resumed = flex_calls[0], flex_calls[-1]
    assert len(flex_calls) == 2 and "continue_final_message" not in first
    partial = resumed["messages"][-1]
    assert partial["role"] == "assistant" and ANSWER.startswith(partial["content"])
    assert resumed["continue_final_message"] is True
    assert resumed["add_generation_prompt"] is False
    produced = len(partial["content"].split())
    assert resumed["max_tokens"] == 12 - produced
    rows = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert len(rows) == 1 and rows[0].preemptions == 1
    assert rows[0].output_tokens == len(ANSWER.split())  # each token billed once
    # the pause closed the flex stream at once: the engine aborted it while the urgent
    # request ran, not after
    assert fake.timeline.index(("closed", 2)) < fake.timeline.index(("complete", 1))


def test_a_backend_without_continuation_is_never_paused_mid_answer(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    fake = FakeUpstream(answer=ANSWER, delay=0.02)
    with serve_fake(fake) as url:
        server = serve(models={"m": {"backends": [upstream(url, engine="openai", slots=1)]}})
        c = clients(server)
        stream = chat(c, "m", "flex", stream=True)
        chunks = iter(stream)
        next(chunks)
        urgent = chat(c, "m", "default")  # waits for the flex answer to end
        rest = "".join(_text(chunk) for chunk in chunks)
    assert urgent.choices[0].message.content == ANSWER
    assert rest == ANSWER and len(fake.received) == 2
    assert all(r.preemptions == 0 for r in server.state.store.ledger("tenant-a"))


def test_a_stream_on_a_dying_upstream_resumes_on_the_other_billed_once(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    dying = FakeUpstream(answer=ANSWER, die_after=3)
    healthy = FakeUpstream(answer=ANSWER)
    with serve_fake(dying) as dying_url, serve_fake(healthy) as healthy_url:
        pool = [
            upstream(dying_url, engine="vllm", name="dying", metrics_url=None),
            upstream(healthy_url, engine="vllm", name="healthy", metrics_url=None),
        ]
        server = serve(models={"m": {"backends": pool}})
        c = clients(server)
        texts = []
        for tier in ("flex", "default", "flex", "default"):
            texts.append("".join(_text(ch) for ch in chat(c, "m", tier, stream=True)))
    assert texts == [ANSWER] * 4  # each stream whole, whichever member it started on
    assert dying.received  # the least-loaded choice did send work to the dying one
    resumed = [body for _, body in healthy.received if body["messages"][-1]["role"] == "assistant"]
    assert all(body["continue_final_message"] for body in resumed)
    rows = server.state.store.ledger("tenant-a")
    assert len(rows) == 4 and all(r.output_tokens == len(ANSWER.split()) for r in rows)


def test_a_pool_with_no_healthy_backend_fails_clearly_and_healthz_says_which(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    with serve_fake(FakeUpstream()) as url:
        dead = url.replace("/v1", "/nothing-here/v1")  # answers 404: a misconfigured backend
        server = serve(models={"m": {"backends": [upstream(dead, engine="vllm", name="gone")]}})
        c = clients(server)
        for _ in range(3):  # the breaker opens after 3 failures
            with pytest.raises(openai.InternalServerError):
                chat(c, "m", "default")
        health = httpx.get(server.base_url + "/healthz")
        metrics = httpx.get(server.base_url + "/metrics").text
    assert health.status_code == 503
    assert health.json()["reason"] == "no healthy backend for model m"
    assert health.json()["models"]["m"] == [{"name": "gone", "kind": "openai", "healthy": False}]
    assert 'flexserve_backend_up{backend="gone",model="m",state="open"} 0.0' in metrics
    assert server.state.store.ledger("tenant-a") == []


def test_upstream_quick_form_serves_every_model_the_upstream_lists(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    fake = FakeUpstream(answer="hi there", models=("alpha", "beta"))
    with serve_fake(fake) as url:
        server = serve(upstream=url, upstream_engine="vllm")
        c = clients(server)
        assert sorted(m.id for m in c.models.list().data) == ["alpha", "beta"]
        answer = c.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "x"}]
        )
    assert answer.choices[0].message.content == "hi there"
    assert fake.received[-1][1]["model"] == "beta"


def _text(chunk: Any) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


def test_a_probe_paused_mid_stream_closes_the_breaker_once_the_engine_answered() -> None:
    """The engine answering at all is the probe's verdict: a probe stream closed early
    (preempted, client gone) must not leave the backend out."""
    import asyncio

    from flexserve.backends.base import GenerationRequest, SamplingParams
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    async def probe(url: str) -> str:
        backend = OpenAIBackend("b", "m", Endpoint(url, None, "fake-model"), 1, Capabilities())
        backend.breaker.failed(0.0)
        backend.breaker.failed(0.0)
        backend.breaker.failed(0.0)  # open
        backend.breaker.opened_at = -100.0  # its cooldown is over: the next call probes
        chunks = backend.generate(GenerationRequest("r", (1,), SamplingParams(8)))
        await anext(chunks)
        await chunks.aclose()  # paused after the first token
        await backend.close()
        return backend.state()

    with serve_fake(FakeUpstream(answer=ANSWER)) as url:
        assert asyncio.run(probe(url)) == "closed"


def test_text_beyond_ascii_reaches_the_client_unchanged_as_json_and_as_a_stream(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    """Answers are encoded by orjson (raw UTF-8, where the engine sent \\u escapes)."""
    words = "café ☃ 😀 naïve 東京 \u00e9\u0301"
    with serve_fake(FakeUpstream(answer=words)) as url:
        server = serve(models={"m": {"backends": [upstream(url, engine="vllm")]}})
        c = clients(server)
        whole = chat(c, "m", "default").choices[0].message.content
        streamed = "".join(_text(chunk) for chunk in chat(c, "m", "default", stream=True))
    assert whole == streamed == words


def test_a_paused_job_on_vllm_tokens_resumes_from_the_prompt_ids_and_the_ids_produced(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    """vLLM's token-level style, against the fake's imitation of vLLM's API (no real
    vLLM runs here): the chat is tokenized by the engine, every call is a raw completion
    of token ids, and a resume sends the prompt's ids followed by the ids produced."""
    fake = FakeUpstream(answer=ANSWER, delay=0.05)
    with serve_fake(fake) as url:
        entry = upstream(url, engine="vllm", continuation="vllm-tokens", slots=1)
        server = serve(models={"m": {"backends": [entry]}})
        received, urgent = flex_stream_preempted_by_default(clients(server))
    assert urgent and urgent[0].choices[0].message.content == ANSWER
    assert "".join(received) == ANSWER  # one stream: no word twice, none missing
    tokenized = [body for path, body in fake.received if path == "/tokenize"]
    assert tokenized and tokenized[0]["messages"][-1]["role"] == "user"
    assert tokenized[0]["add_generation_prompt"] is True
    flex = [b for p, b in fake.received if p == "/v1/completions" and b["priority"] == 2]
    first, resumed = flex
    assert first["prompt"] == list(PROMPT_IDS) and first["return_token_ids"] is True
    produced = resumed["prompt"][len(PROMPT_IDS) :]
    assert resumed["prompt"][: len(PROMPT_IDS)] == list(PROMPT_IDS)
    assert produced == [WORD_ID + k for k in range(len(produced))] and produced
    assert resumed["max_tokens"] == 12 - len(produced)
    assert resumed["stream_options"] == {"include_usage": True}
    rows = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert len(rows) == 1 and rows[0].preemptions == 1
    assert rows[0].output_tokens == len(ANSWER.split())  # each token billed once
    # the prompt once, as the engine counted it (not with the ids produced resent)
    assert rows[0].input_tokens == len(PROMPT_IDS)


def test_a_job_failing_over_from_a_text_level_member_to_vllm_tokens_resumes_as_text(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    """Tokens produced by a text-level member have no engine id: a vllm-tokens member
    resumes them text-level (continue_final_message), and nothing is billed twice."""
    dying = FakeUpstream(answer=ANSWER, die_after=3)
    healthy = FakeUpstream(answer=ANSWER)
    with serve_fake(dying) as dying_url, serve_fake(healthy) as healthy_url:
        pool = [
            upstream(dying_url, engine="vllm", name="dying", metrics_url=None),
            upstream(healthy_url, engine="vllm", continuation="vllm-tokens", metrics_url=None),
        ]
        server = serve(models={"m": {"backends": pool}})
        c = clients(server)
        texts = ["".join(_text(ch) for ch in chat(c, "m", "flex", stream=True)) for _ in range(4)]
    assert texts == [ANSWER] * 4
    assert dying.received
    resumed = [b for _, b in healthy.received if b.get("continue_final_message")]
    assert resumed and all(b["messages"][-1]["role"] == "assistant" for b in resumed)
    fresh = [b for p, b in healthy.received if p == "/v1/completions"]
    assert all(isinstance(b["prompt"], list) for b in fresh)  # its own jobs: token ids
    rows = server.state.store.ledger("tenant-a")
    assert len(rows) == 4 and all(r.output_tokens == len(ANSWER.split()) for r in rows)


@pytest.mark.parametrize(
    ("engine", "tokenize_status", "counted"),
    [("vllm", 200, len(PROMPT_IDS)), ("vllm", 429, None), ("openai", 200, None)],
)
def test_a_cut_stream_is_billed_the_prompt_as_the_engine_counts_it_where_it_can(
    serve: Serve,
    clients: Callable[[RunningServer], openai.OpenAI],
    engine: str,
    tokenize_status: int,
    counted: Any,
) -> None:
    """The engine's usage comes at the end of its stream: for a stream the client cuts,
    vLLM is asked (`/tokenize`, the chat as its template renders it); an engine with no
    such call (OpenAI), or one that refuses to count, leaves flexserve's estimate billed,
    never an unbilled job."""
    fake = FakeUpstream(answer=ANSWER, delay=0.05, tokenize_status=tokenize_status)
    with serve_fake(fake) as url:
        server = serve(models={"m": {"backends": [upstream(url, engine=engine, metrics_url=None)]}})
        stream = chat(clients(server), "m", "default", stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()
        server.wait_until(lambda: bool(server.state.store.ledger("tenant-a")), timeout=30)
    (row,) = server.state.store.ledger("tenant-a")
    assert row.outcome == "cancelled" and row.output_tokens >= 1
    tokenized = [body for path, body in fake.received if path == "/tokenize"]
    if counted is None:
        assert tokenized == [] if engine == "openai" else len(tokenized) == 1
        assert row.input_tokens >= 1  # the estimate
    else:
        assert row.input_tokens == counted
        assert tokenized[-1]["messages"] == [{"role": "user", "content": "count"}]


@pytest.mark.parametrize(
    ("engine", "asked", "refused"),
    [
        ("llamacpp", {"min_tokens": 3}, "min_tokens"),  # llama-server has none
        ("llama-cpp-python", {"ignore_eos": True}, "ignore_eos"),
        ("openai", {"top_k": 5}, "top_k"),
        ("openai", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ],
)
def test_a_vllm_extension_the_engine_cannot_honour_is_refused_by_name_not_dropped(
    serve: Serve, engine: str, asked: dict[str, Any], refused: str
) -> None:
    fake = FakeUpstream(answer=ANSWER)
    with serve_fake(fake) as url:
        backend = upstream(url, engine=engine)
        if engine == "llama-cpp-python":
            backend["continuation"] = "none"  # its own style needs the GGUF's template
        server = serve(models={"m": {"backends": [backend]}})
        body = {"model": "m", "messages": [{"role": "user", "content": "count"}], **asked}
        answer = httpx.post(
            server.url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEY}"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == refused
    assert fake.received == []  # refused before the engine saw it


@pytest.mark.parametrize(
    ("engine", "continuation", "off"),
    [
        ("llamacpp", "llamacpp", {"mirostat": 0, "dry_multiplier": 0.0, "typical_p": 1.0}),
        ("llama-cpp-python", "none", {}),
    ],
)
def test_llama_cpp_engines_get_their_own_sampler_names_and_no_defaults_of_their_own(
    serve: Serve,
    clients: Callable[[RunningServer], openai.OpenAI],
    engine: str,
    continuation: str,
    off: dict[str, Any],
) -> None:
    """llama.cpp calls vLLM's repetition_penalty repeat_penalty, and samples with top_k 40
    and min_p 0.05 unless told otherwise (llama-cpp-python with repeat_penalty 1.1 too):
    a client that asked for none of them gets none of them, as on vLLM or OpenAI. On
    llama-server, samplers its command line may turn on (mirostat, dry, xtc, typical,
    top-n-sigma) are off too, as its token-level style sends them."""
    fake = FakeUpstream(answer=ANSWER)
    with serve_fake(fake) as url:
        member = upstream(url, engine=engine, continuation=continuation)
        server = serve(models={"m": {"backends": [member]}})
        c = clients(server)
        chat(c, "m", "default", max_tokens=2)
        chat(c, "m", "default", max_tokens=2, extra_body={"repetition_penalty": 1.3, "top_k": 7})
    plain, asked = (body for _, body in fake.received)
    assert (plain["top_k"], plain["min_p"], plain["repeat_penalty"]) == (0, 0.0, 1.0)
    assert {name: plain.get(name) for name in off} == off
    assert (asked["top_k"], asked["repeat_penalty"]) == (7, 1.3)
    assert "repetition_penalty" not in asked and "min_tokens" not in asked
    if not off:  # llama-cpp-python names them otherwise: nothing it does not know
        assert "mirostat" not in plain and "dry_multiplier" not in plain


def test_a_backend_that_refuses_connections_at_start_is_out_from_the_start(
    serve: Serve, clients: Callable[[RunningServer], openai.OpenAI]
) -> None:
    """Probed at start: /healthz does not call an engine healthy that nothing listens
    for, and a request gets 503 with Retry-After (retry shortly), not a 500."""
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    server = serve(models={"m": {"backends": [upstream(nobody, engine="vllm", name="down")]}})
    health = httpx.get(server.base_url + "/healthz")
    assert health.status_code == 503
    assert health.json()["models"]["m"] == [{"name": "down", "kind": "openai", "healthy": False}]
    with pytest.raises(openai.InternalServerError) as refused:
        chat(clients(server), "m", "default")
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"]
    assert server.state.store.ledger("tenant-a") == []


def test_an_upstream_that_wants_a_key_is_named_at_start_in_one_line(tmp_path: Any) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from flexserve.backends.upstream.discovery import discover_models
    from flexserve.config import InvalidSettings, load_settings
    from tests.fakes.upstream import serve_app

    async def models(request: Any) -> JSONResponse:
        return JSONResponse({"error": {"message": "no key"}}, status_code=401)

    app = Starlette(routes=[Route("/v1/models", models)])
    with serve_app(app, "locked") as url, pytest.raises(InvalidSettings) as refused:
        discover_models(load_settings(None, data_dir=tmp_path, upstream=url))
    message = str(refused.value)
    assert "\n" not in message and "401" in message
    assert "FLEXSERVE_UPSTREAM_API_KEY" in message


def test_a_paused_calls_tokens_and_time_count_in_the_backends_stats() -> None:
    """What the engine sampled before a pause was sampled all the same, and its slot was
    busy meanwhile (the dashboard's utilization reads these): counted with an injected
    clock, not only for calls that reach their end."""
    import asyncio

    from flexserve.backends.base import GenerationRequest, SamplingParams
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    times = iter([10.0, 13.5, 20.0, 21.0])

    async def run(url: str) -> tuple[float, int]:
        endpoint = Endpoint(url, None, "fake-model")
        backend = OpenAIBackend("b", "m", endpoint, 1, Capabilities(), clock=lambda: next(times))
        request = GenerationRequest("r", (1,), SamplingParams(12))
        chunks = backend.generate(request)
        await anext(chunks), await anext(chunks), await anext(chunks)
        await chunks.aclose()  # paused after three tokens
        whole = [chunk async for chunk in backend.generate(request)]  # a whole answer
        await backend.close()
        assert len(whole) == 13  # 12 tokens and the finish
        stats = backend.stats()
        return stats.busy_slot_seconds, stats.sampled_tokens

    with serve_fake(FakeUpstream(answer=ANSWER)) as url:
        busy, sampled = asyncio.run(run(url))
    assert sampled == 3 + 12
    assert busy == (13.5 - 10.0) + (21.0 - 20.0)


def test_an_engine_out_is_probed_as_each_cooldown_ends_and_let_back_when_it_answers() -> None:
    """Not only when a request happens by: a dead engine stays out (cooldown doubling),
    and one that answers again is ready for a request to be its probe (injected clock)."""
    import asyncio

    from flexserve.backends.base import GenerationRequest, SamplingParams
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    now = [0.0]

    async def run(live: str) -> list[tuple[str, bool]]:
        dead = Endpoint(f"http://127.0.0.1:{free_port()}/v1", None, "fake-model")
        backend = OpenAIBackend("b", "m", dead, 1, Capabilities(), clock=lambda: now[0])
        seen = []
        await backend._probe_at_start()
        seen.append((backend.breaker.state, backend.health()))  # out from the start
        now[0] = 3.0  # its cooldown (2 s) is over
        await backend.reprobe()
        seen.append((backend.breaker.state, backend.health()))  # still dead: out again
        backend.endpoint = Endpoint(live, None, "fake-model")  # the engine is back
        now[0] = 8.0  # the doubled cooldown (4 s) is over
        await backend.reprobe()
        seen.append((backend.breaker.state, backend.health()))  # ready for a request
        request = GenerationRequest("r", (1,), SamplingParams(2))
        _ = [chunk async for chunk in backend.generate(request)]  # the real probe
        seen.append((backend.breaker.state, backend.health()))
        await backend.close()
        return seen

    with serve_fake(FakeUpstream(answer=ANSWER)) as url:
        seen = asyncio.run(run(url))
    assert seen == [("open", False), ("open", False), ("half_open", True), ("closed", True)]
