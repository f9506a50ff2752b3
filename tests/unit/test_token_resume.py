"""Token-level resume on llama-server's native API: the calls flexserve builds, and how
it reads the native stream. (The real server is in tests/integration/test_llama_server.py.)"""

from __future__ import annotations

from flexserve.backends.base import GenerationRequest, SamplingParams, TokenChunk
from flexserve.backends.upstream.backend import UPSTREAM_TOKEN, Capabilities
from flexserve.backends.upstream.llamacpp_tokens import build_token_call
from flexserve.backends.upstream.seam import Seam, tokens_of
from flexserve.backends.upstream.stream import TextDelta, _Progress, _read_native, server_root
from flexserve.config.pools import PoolBackendSettings

PROMPT = "<|im_start|>user\ncount<|im_end|>\n<|im_start|>assistant\n"


def test_a_fresh_start_sends_the_rendered_prompt_to_the_native_completion_route() -> None:
    call = build_token_call("smol", PROMPT, SamplingParams(max_tokens=20, temperature=0, seed=3))
    assert (call.path, call.at_root, call.wire) == ("/completion", True, "llamacpp")
    assert call.body["prompt"] == PROMPT and call.body["model"] == "smol"
    assert call.body["return_tokens"] is True and call.body["stream"] is True
    assert call.body["n_predict"] == 20
    assert (call.body["temperature"], call.body["seed"]) == (0, 3)


def test_a_resume_sends_the_prompt_then_the_ids_produced_never_their_text() -> None:
    produced = [TokenChunk(12, "One"), TokenChunk(7, ""), TokenChunk(99, " two")]
    call = build_token_call("smol", PROMPT, SamplingParams(max_tokens=20), produced)
    assert call.body["prompt"] == [PROMPT, 12, 7, 99]
    assert call.body["n_predict"] == 17


def test_tokens_the_engine_did_not_name_go_back_as_text_with_the_one_completing_them() -> None:
    # "猫" is three tokens: llama-server streamed one chunk for it, naming the last only
    produced = [
        TokenChunk(40, "a "),
        TokenChunk(UPSTREAM_TOKEN, ""),
        TokenChunk(UPSTREAM_TOKEN, ""),
        TokenChunk(121, "猫"),
        TokenChunk(41, " b"),
    ]
    call = build_token_call("smol", PROMPT, SamplingParams(max_tokens=9), produced)
    assert call.body["prompt"] == [PROMPT, 40, "猫", 41]
    assert call.body["n_predict"] == 4  # all five were generated, named or not


def test_tokens_produced_by_a_text_level_member_of_the_pool_go_back_as_text() -> None:
    produced = [TokenChunk(UPSTREAM_TOKEN, "One"), TokenChunk(UPSTREAM_TOKEN, " two")]
    call = build_token_call("smol", PROMPT, SamplingParams(max_tokens=5), produced)
    assert call.body["prompt"] == PROMPT + "One two"
    assert call.body["n_predict"] == 3


def test_every_sampler_is_set_to_what_the_client_asked_not_llama_servers_defaults() -> None:
    call = build_token_call("smol", PROMPT, SamplingParams(max_tokens=4))
    # llama-server's own defaults are top_k 40, min_p 0.05, temperature 0.8: not OpenAI's
    assert call.body["top_k"] == 0 and call.body["min_p"] == 0.0
    assert (call.body["temperature"], call.body["top_p"]) == (1.0, 1.0)
    assert call.body["repeat_penalty"] == 1.0
    assert "seed" not in call.body  # none asked: the engine's own
    vllm_off = build_token_call("smol", PROMPT, SamplingParams(max_tokens=4, top_k=-1))
    assert vllm_off.body["top_k"] == 0


def test_tokens_inside_a_utf8_character_that_got_no_chunk_are_counted() -> None:
    progress = _Progress()
    assert _read_native({"content": "こ", "tokens": [237], "tokens_predicted": 2}, progress) == [
        TextDelta("こ", (237,), unnamed=1)
    ]
    assert _read_native({"content": "、", "tokens": [9], "tokens_predicted": 3}, progress) == [
        TextDelta("、", (9,))
    ]
    counted = [TokenChunk(UPSTREAM_TOKEN, ""), TokenChunk(237, "こ")]
    assert tokens_of(TextDelta("こ", (237,), unnamed=1)) == counted
    seam = Seam([], echoes=False)
    assert seam.chunks(TextDelta("こ", (237,), unnamed=1)) == counted


def test_the_native_stream_gives_each_tokens_id_and_its_end_with_the_engines_counts() -> None:
    progress = _Progress()
    first = _read_native({"content": "Hi", "tokens": [5], "stop": False}, progress)
    held = _read_native({"content": "", "tokens": [6], "stop": False}, progress)
    assert first == [TextDelta("Hi", (5,))] and held == [TextDelta("", (6,))]
    assert progress.finish is None
    end = {"content": "", "tokens": [], "stop": True, "stop_type": "limit"}
    assert _read_native(end | {"tokens_evaluated": 30, "tokens_predicted": 2}, progress) == []
    assert progress.finish == "length"
    assert progress.usage == {"prompt_tokens": 30, "completion_tokens": 2}
    _read_native({"stop": True, "stop_type": "eos"}, progress)
    assert progress.finish == "stop"


def test_text_released_by_several_tokens_goes_with_the_last_one() -> None:
    assert tokens_of(TextDelta("ab", (1, 2))) == [TokenChunk(1, ""), TokenChunk(2, "ab")]
    assert tokens_of(TextDelta("ab")) == [TokenChunk(UPSTREAM_TOKEN, "ab")]


def test_tokens_whose_text_was_held_at_the_pause_are_generated_again_not_counted_again() -> None:
    # "é" is two tokens here: the first was streamed with no text (an incomplete UTF-8
    # character) when the pause came; sending its id would lose its bytes for good.
    produced = [TokenChunk(10, "caf"), TokenChunk(11, "")]
    seam = Seam(produced, echoes=False)
    assert seam.regenerate == 1 and list(seam.sent) == [TokenChunk(10, "caf")]
    assert build_token_call("smol", PROMPT, SamplingParams(max_tokens=8), seam.sent).body[
        "prompt"
    ] == [
        PROMPT,
        10,
    ]
    # the engine streams the held token again (no text yet), then the one releasing "é"
    assert seam.chunks(TextDelta("", (11,))) == []  # already counted before the pause
    assert seam.chunks(TextDelta("é", (12,))) == [TokenChunk(12, "é")]
    assert seam.chunks(TextDelta("!", (13,))) == [TokenChunk(13, "!")]
    assert seam.streamed == 3 and seam.held == ""


def test_text_of_a_regenerated_token_goes_with_the_next_one_or_the_finish() -> None:
    seam = Seam([TokenChunk(1, "a"), TokenChunk(2, "")], echoes=False)
    assert seam.chunks(TextDelta("b", (5,))) == []  # regenerated: different, uncounted
    assert seam.held == "b"
    assert seam.chunks(TextDelta("c", (6,))) == [TokenChunk(6, "bc")]


def test_a_text_level_resume_also_regenerates_held_tokens_instead_of_counting_them_twice() -> None:
    produced = [TokenChunk(UPSTREAM_TOKEN, "a"), TokenChunk(UPSTREAM_TOKEN, "")]
    seam = Seam(produced, echoes=False)
    assert seam.regenerate == 1 and list(seam.sent) == produced[:1]
    assert seam.chunks(TextDelta("b")) == []  # the held one, generated again
    assert seam.chunks(TextDelta("c")) == [TokenChunk(UPSTREAM_TOKEN, "bc")]
    assert Seam(produced[:1], echoes=False).sent == produced[:1]


def test_llama_server_resumes_on_its_chat_api_unless_token_level_is_chosen() -> None:
    entry = PoolBackendSettings(kind="openai", base_url="http://h:1/v1", engine="llamacpp")
    assert entry.capabilities()[1] == "llamacpp"
    tokens = entry.model_copy(update={"continuation": "llamacpp-tokens"})
    assert tokens.capabilities()[1] == "llamacpp-tokens"
    assert "token-level" in Capabilities(continuation="llamacpp-tokens").guarantee()
    assert server_root("http://h:1/v1/") == "http://h:1"


def test_vllm_token_calls_send_ids_and_fall_back_to_text_for_tokens_without_one() -> None:
    from flexserve.backends.upstream.backend import Endpoint, OpenAIBackend
    from flexserve.backends.upstream.vllm_tokens import build_vllm_token_call

    produced = [TokenChunk(12, "One"), TokenChunk(7, " two")]
    call = build_vllm_token_call("m", [1, 2], SamplingParams(max_tokens=9), produced, {})
    assert call.path == "/completions" and call.body["prompt"] == [1, 2, 12, 7]
    assert call.body["return_token_ids"] is True and call.body["max_tokens"] == 7
    backend = OpenAIBackend(
        "b", "m", Endpoint("http://h:1/v1", None, "m"), 1, Capabilities(continuation="vllm-tokens")
    )
    request = GenerationRequest("r", (), SamplingParams(max_tokens=9))
    assert backend._style_for(request, produced) == "vllm-tokens"
    assert backend._style_for(request, [TokenChunk(UPSTREAM_TOKEN, "One")]) == "vllm"
    # vLLM holds back characters, not tokens, for stop strings: text-level then
    stopping = GenerationRequest("r", (), SamplingParams(max_tokens=9, stop=("\nUser:",)))
    assert backend._style_for(stopping, produced) == "vllm"


def test_a_job_paused_after_its_last_token_finishes_without_asking_the_engine_again() -> None:
    """Paused between its last token and the finish: resuming must not ask the engine
    for one more token past max_tokens (no upstream runs here: a call would fail)."""
    import asyncio

    from flexserve.backends.base import Finish
    from flexserve.backends.upstream.backend import Endpoint, OpenAIBackend

    backend = OpenAIBackend(
        "b", "m", Endpoint("http://127.0.0.1:9/v1", None, "m"), 1, Capabilities("none", "vllm")
    )
    request = GenerationRequest("r", (), SamplingParams(max_tokens=2))
    produced = [TokenChunk(UPSTREAM_TOKEN, "a"), TokenChunk(UPSTREAM_TOKEN, " b")]

    async def run() -> list[object]:
        try:
            return [chunk async for chunk in backend.generate(request, produced)]
        finally:
            await backend.close()

    assert asyncio.run(run()) == [Finish("length")]


def test_a_failed_side_call_names_its_route_not_the_upstreams_address() -> None:
    """Its message reaches the client (a 500's text) and the logs: never the upstream's
    host, nor credentials a base_url may carry."""
    import asyncio

    import aiohttp

    from flexserve.backends.base import BackendError
    from flexserve.backends.upstream.stream import post_json

    async def call() -> str:
        async with aiohttp.ClientSession() as http:
            try:
                await post_json(http, "http://user:secret@127.0.0.1:9/tokenize", None, {})
            except BackendError as error:
                return str(error)
        return "no error"

    message = asyncio.run(call())
    assert "/tokenize" in message and "secret" not in message and "127.0.0.1" not in message
