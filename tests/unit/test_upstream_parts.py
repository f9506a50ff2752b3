"""The pure building blocks of the `openai` backend: priority mapping, continuation
requests, the circuit breaker and an engine's load from its metrics."""

from __future__ import annotations

import pytest

from flexserve.backends.base import BackendError, ChatMessage, SamplingParams
from flexserve.backends.upstream import (
    CannotContinue,
    CircuitBreaker,
    build_call,
    parse_engine_load,
    priority_fields,
)
from flexserve.backends.upstream import stream as upstream_stream
from flexserve.backends.upstream.stream import MAX_LINE, EventParser
from flexserve.scheduling.tiers import TIERS

MESSAGES = (ChatMessage("system", "be brief"), ChatMessage("user", "count"))


def test_vllm_runs_lower_priority_values_first_and_sglang_higher() -> None:
    vllm = [priority_fields("vllm", tier)["priority"] for tier in TIERS]
    sglang = [priority_fields("sglang", tier)["priority"] for tier in TIERS]
    # TIERS is ordered most urgent first: priority, default, flex, batch.
    assert vllm == sorted(vllm) and len(set(vllm)) == len(TIERS)
    assert sglang == sorted(sglang, reverse=True) and len(set(sglang)) == len(TIERS)
    assert priority_fields("none", "priority") == {}


def test_a_fresh_start_is_a_plain_chat_completion_in_every_style() -> None:
    sampling = SamplingParams(max_tokens=20)
    for style in ("vllm", "llamacpp", "completions", "none"):
        call = build_call(style, model="m", messages=MESSAGES, sampling=sampling)  # type: ignore[arg-type]
        assert call.path == "/chat/completions"
        assert call.body["messages"][-1] == {"role": "user", "content": "count"}
        assert call.body["max_tokens"] == 20
        assert "continue_final_message" not in call.body


def test_vllm_resume_continues_the_final_assistant_message_with_fewer_tokens() -> None:
    sampling = SamplingParams(max_tokens=20, min_tokens=8)
    call = build_call(
        "vllm", model="m", messages=MESSAGES, sampling=sampling, partial="one two", produced=5
    )
    assert call.body["messages"][-1] == {"role": "assistant", "content": "one two"}
    assert call.body["continue_final_message"] is True
    assert call.body["add_generation_prompt"] is False
    assert call.body["max_tokens"] == 15
    assert call.body["min_tokens"] == 3


def test_llamacpp_resume_sends_a_trailing_assistant_message_only() -> None:
    call = build_call(
        "llamacpp",
        model="m",
        messages=MESSAGES,
        sampling=SamplingParams(max_tokens=10),
        partial="one",
        produced=1,
    )
    assert call.body["messages"][-1] == {"role": "assistant", "content": "one"}
    assert "continue_final_message" not in call.body
    assert call.body["max_tokens"] == 9


def test_completions_resume_renders_the_template_and_appends_the_partial_answer() -> None:
    def render(messages: object) -> str:
        return "<|user|>count<|assistant|>"

    call = build_call(
        "completions",
        model="m",
        messages=MESSAGES,
        sampling=SamplingParams(max_tokens=10),
        partial="one two",
        produced=2,
        render=render,
    )
    assert call.path == "/completions"
    assert call.body["prompt"] == "<|user|>count<|assistant|>one two"
    assert "messages" not in call.body


def test_a_backend_without_continuation_cannot_resume_a_partial_answer() -> None:
    with pytest.raises(CannotContinue):
        build_call("none", model="m", messages=MESSAGES, sampling=SamplingParams(4), partial="x")


def test_vllm_extensions_are_sent_only_when_asked_for() -> None:
    plain = build_call("vllm", model="m", messages=MESSAGES, sampling=SamplingParams(4)).body
    for name in ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "seed", "stop"):
        assert name not in plain
    asked = SamplingParams(4, top_k=5, repetition_penalty=1.1, ignore_eos=True, seed=3)
    body = build_call("vllm", model="m", messages=MESSAGES, sampling=asked).body
    assert (body["top_k"], body["repetition_penalty"], body["ignore_eos"], body["seed"]) == (
        5,
        1.1,
        True,
        3,
    )


def test_breaker_opens_after_failures_probes_once_then_closes_on_success() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown=5.0)
    breaker.failed(now=0.0)
    assert breaker.allows(0.0)
    breaker.failed(now=1.0)
    assert breaker.state == "open" and not breaker.allows(2.0) and not breaker.healthy(2.0)
    assert breaker.allows(6.0)  # the probe
    assert not breaker.allows(6.1)  # only one probe at a time
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allows(6.2)


def test_breaker_failed_probe_doubles_the_cooldown() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown=2.0, max_cooldown=5.0)
    breaker.failed(now=0.0)
    assert breaker.allows(2.0)
    breaker.failed(now=2.0)  # the probe failed: open for 4 s now
    assert not breaker.allows(5.9) and breaker.allows(6.0)
    breaker.failed(now=6.0)  # capped at max_cooldown
    assert not breaker.allows(10.9) and breaker.allows(11.0)


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
"""


def test_engine_load_from_vllm_metrics_and_stale_counts_as_saturated() -> None:
    load = parse_engine_load(VLLM_METRICS, now=10.0)
    assert load is not None
    assert (load.running, load.waiting, load.kv_usage) == (3.0, 2.0, 0.5)
    assert load.score(now=11.0, stale_after=5.0) == 3.0 + 2 * 2.0
    assert load.score(now=16.0, stale_after=5.0) == float("inf")
    assert parse_engine_load("# nothing here\n", now=0.0) is None


def test_a_probe_ended_without_a_verdict_lets_another_request_probe() -> None:
    """Before: a probe paused or abandoned mid-stream left the breaker half-open for
    ever (no request allowed, unhealthy): the backend was out until a restart."""
    breaker = CircuitBreaker(failure_threshold=1, cooldown=2.0)
    breaker.failed(now=0.0)
    assert breaker.allows(now=3.0)  # the probe
    assert not breaker.allows(now=3.0)
    breaker.release_probe()
    # healthy too: a pool routes by health, and would never send it the next probe
    assert breaker.healthy(now=3.5)
    assert breaker.allows(now=3.5) and breaker.remaining(now=3.5) == 0.0
    assert not breaker.healthy(now=3.5)  # while that probe is out, others get the work


STREAM = (
    b": a comment\r\n"
    b'data: {"a": 1}\r\n\r\n'
    b"event: ignored\n"
    b"data: first line\n"
    b"data:second line\n\n"
    + "data: caf\u00e9 \u2603\n\n".encode()
    + b"data: [DONE]"  # the last event, without its blank line
)
EVENTS = ['{"a": 1}', "first line\nsecond line", "caf\u00e9 \u2603", "[DONE]"]


def parse(pieces: list[bytes]) -> list[str]:
    parser = EventParser()
    events = [data for piece in pieces for data in parser.feed(piece)]
    return events + parser.end()


def test_events_are_the_same_however_the_bytes_are_cut_into_reads() -> None:
    """A read may end anywhere: inside a line, between \\r and \\n, inside a UTF-8
    character."""
    assert parse([STREAM]) == EVENTS
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EVENTS
    for cut in range(len(STREAM)):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EVENTS


def test_a_line_that_never_ends_is_a_broken_stream() -> None:
    parser = EventParser()
    with pytest.raises(BackendError, match="longer than"):
        for _ in range(MAX_LINE // (1 << 20) + 1):
            parser.feed(b"x" * (1 << 20))


def test_an_event_that_is_not_utf8_is_a_broken_stream() -> None:
    with pytest.raises(BackendError, match="UTF-8"):
        parse([b"data: \xff\xfe\n\n"])


def test_a_chunk_python_parses_but_orjson_refuses_is_still_read() -> None:
    """orjson (the fast path) refuses NaN and lone surrogates; the standard parser takes
    them, so such an engine's chunks are not counted as failures."""
    assert upstream_stream._json('{"x": NaN, "t": "\\ud83d"}')["t"] == "\ud83d"
    with pytest.raises(BackendError, match="not JSON"):
        upstream_stream._json("{broken")


def test_an_echoed_partial_answer_is_dropped_from_the_first_delta_only() -> None:
    from flexserve.backends.upstream.continuation import EchoedPrefix

    merged = EchoedPrefix("Once upon")
    assert [merged.after_echo(t) for t in ("", "Once upon a", "Once upon")] == [
        "",
        " a",
        "Once upon",  # later text is never taken for the echo
    ]
    none = EchoedPrefix("Once upon")  # an engine that does not echo
    assert [none.after_echo(t) for t in ("Once", " upon")] == ["Once", " upon"]
