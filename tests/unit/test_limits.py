"""Per-key limits over a sliding minute, at times the test gives (no clock is read)."""

from __future__ import annotations

from flexserve.api.limits import Limits, Windows, _duration


def admit(
    windows: Windows, limits: Limits, request_id: str, tokens: int, now: float
) -> float | None:
    return windows.admit("key_1", limits, request_id, 0, tokens, now).retry_after


def test_requests_per_minute_slide_and_retry_after_is_when_the_oldest_leaves() -> None:
    windows, limits = Windows(), Limits(requests_per_minute=2)
    assert admit(windows, limits, "a", 1, now=0.0) is None
    assert admit(windows, limits, "b", 1, now=10.0) is None
    assert admit(windows, limits, "c", 1, now=30.0) == 30.0  # "a" leaves at 60
    assert admit(windows, limits, "d", 1, now=60.0) is None
    assert admit(windows, limits, "e", 1, now=61.0) == 9.0  # "b" leaves at 70


def test_tokens_per_minute_count_prompt_plus_max_tokens_then_what_was_produced() -> None:
    windows, limits = Windows(), Limits(tokens_per_minute=100)
    assert windows.admit("key_1", limits, "a", 10, 80, now=0.0).retry_after is None
    assert admit(windows, limits, "b", 30, now=1.0) == 59.0  # 80 + 30 > 100
    windows.settled("a", produced=5)  # "a" used 10 + 5 tokens, not 80
    assert admit(windows, limits, "b", 30, now=2.0) is None


def test_a_request_larger_than_the_whole_token_limit_never_fits() -> None:
    windows, limits = Windows(), Limits(tokens_per_minute=100)
    assert admit(windows, limits, "a", 101, now=0.0) == 60.0


def test_concurrent_requests_free_their_place_when_finished() -> None:
    windows, limits = Windows(), Limits(concurrent_requests=1)
    assert admit(windows, limits, "a", 1, now=0.0) is None
    assert admit(windows, limits, "b", 1, now=0.0) is not None
    windows.finished("a")
    assert admit(windows, limits, "b", 1, now=0.0) is None


def test_keys_are_limited_apart() -> None:
    windows, limits = Windows(), Limits(requests_per_minute=1)
    assert windows.admit("key_1", limits, "a", 0, 1, now=0.0).retry_after is None
    assert windows.admit("key_2", limits, "b", 0, 1, now=0.0).retry_after is None


def test_headers_say_limit_remaining_and_reset_in_openai_style() -> None:
    windows = Windows()
    limits = Limits(requests_per_minute=3, tokens_per_minute=1000)
    windows.admit("key_1", limits, "a", 0, 100, now=0.0)
    headers = windows.admit("key_1", limits, "b", 0, 300, now=59.5).headers
    assert headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    later = windows.admit("key_1", limits, "c", 0, 1, now=60.2).headers
    assert later["x-ratelimit-remaining-requests"] == "1"  # "a" left the window
    assert later["x-ratelimit-remaining-tokens"] == "699"


def test_durations_read_like_openais() -> None:
    assert [_duration(s) for s in (0.02, 1.5, 59.25, 360.0)] == ["20ms", "1.5s", "59.25s", "6m0s"]


def test_no_limits_no_headers() -> None:
    assert Windows().admit("key_1", Limits(), "a", 0, 10, now=0.0).headers == {}


def test_a_job_that_settles_after_its_client_left_still_corrects_its_tokens() -> None:
    windows, limits = Windows(), Limits(tokens_per_minute=100)
    assert windows.admit("key_1", limits, "a", 10, 80, now=0.0).retry_after is None
    windows.finished("a")  # the client hung up; the runtime settles the job just after
    windows.settled("a", produced=5)
    assert admit(windows, limits, "b", 30, now=1.0) is None
    assert windows.in_flight() == 1  # only "b"


def test_jobs_that_never_settle_are_forgotten_once_out_of_the_window() -> None:
    windows, limits = Windows(), Limits(tokens_per_minute=1000)
    for n in range(50):
        admit(windows, limits, f"r{n}", 1, now=float(n))
        windows.finished(f"r{n}")  # cancelled before starting: never settled
    admit(windows, limits, "late", 1, now=200.0)
    assert len(windows._unsettled) == 1


def test_a_settle_after_its_admission_left_the_window_changes_nothing() -> None:
    windows, limits = Windows(), Limits(tokens_per_minute=100)
    assert windows.admit("key_1", limits, "a", 10, 80, now=0.0).retry_after is None
    assert windows.admit("key_1", limits, "b", 10, 90, now=61.0).retry_after is None  # a out
    windows.settled("a", produced=5)  # "a" no longer counts: its correction must not either
    assert windows.admit("key_1", limits, "c", 10, 11, now=62.0).retry_after is not None
    assert windows.admit("key_1", limits, "d", 10, 10, now=62.0).retry_after is None
