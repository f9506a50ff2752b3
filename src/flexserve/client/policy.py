"""The flex policy as pure decisions: what to send, how long to wait, when to give up.

Nothing here does I/O or reads a clock; the sync and async clients pass `now` in, so
both follow exactly the same rules and the rules are tested without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import openai

REFUSAL_CODE = "resource_unavailable"
"""The error code of a flex request that could not be served in time (flexserve, OpenAI)."""
MAX_WAIT_HEADER = "X-Flex-Max-Wait"
"""flexserve's per-request flex deadline, in seconds; other servers ignore it."""


@dataclass(frozen=True)
class FlexPolicy:
    """How a `FlexClient` spends time to save money."""

    wait_budget: float = 900.0
    """Seconds, from the first flex attempt, the client may spend before it stops trying
    flex. A refusal whose Retry-After would end past the budget ends the trying at once."""
    fallback: Literal["default", "raise"] = "default"
    """Once flex is given up: send the request at `default` (full price), or raise
    `FlexUnavailableError`."""
    timeout: float = 900.0
    """Read timeout of each flex attempt: flex may queue, so longer than the SDK's 600 s
    (OpenAI advises at least 900 s). The fallback keeps the client's own timeout."""
    max_wait_header: float | None = None
    """Sent as `X-Flex-Max-Wait` on flex attempts: flexserve refuses at once what cannot
    start within this many seconds, rather than after its own `flex_max_wait`."""
    backoff_initial: float = 1.0
    """Wait after a refusal without Retry-After; doubles after each such refusal."""
    backoff_max: float = 60.0
    """Longest wait after a refusal without Retry-After."""
    min_delay: float = 0.25
    """Shortest wait between attempts, so a `Retry-After: 0` cannot make a busy loop."""

    def __post_init__(self) -> None:
        numbers = {
            "wait_budget": self.wait_budget,
            "timeout": self.timeout,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max,
            "min_delay": self.min_delay,
        }
        if self.max_wait_header is not None:
            numbers["max_wait_header"] = self.max_wait_header
        for name, value in numbers.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"FlexPolicy.{name} must be a finite number >= 0, not {value}")
        if self.fallback not in ("default", "raise"):
            raise ValueError(
                f"FlexPolicy.fallback must be 'default' or 'raise', not {self.fallback!r}"
            )


@dataclass(frozen=True)
class Refusal:
    """One `429 resource_unavailable`, as the policy needs it."""

    error: openai.RateLimitError
    retry_after: float | None
    """Seconds the server asked to wait (Retry-After-Ms, else Retry-After), if it said."""


class FlexUnavailableError(Exception):
    """Flex was refused and the wait budget could not cover another try (fallback="raise").

    `retry_after` is the server's last Retry-After in seconds (None if it sent none);
    `error` is that last refusal, also chained as `__cause__`.
    """

    def __init__(self, refusal: Refusal, attempts: int, waited_seconds: float, budget: float):
        self.error = refusal.error
        self.retry_after = refusal.retry_after
        self.attempts = attempts
        self.waited_seconds = waited_seconds
        self.wait_budget = budget
        asked = (
            "no Retry-After"
            if refusal.retry_after is None
            else (f"Retry-After {refusal.retry_after:g} s")
        )
        super().__init__(
            f"flex refused {attempts} time(s) (resource_unavailable, {asked}); "
            f"waited {waited_seconds:g} s of a {budget:g} s budget, and fallback='raise'"
        )


def as_refusal(error: openai.RateLimitError, now_epoch: float) -> Refusal | None:
    """The refusal in a 429, or None for any other 429 (a rate limit, a quota)."""
    if error.code != REFUSAL_CODE:
        return None
    return Refusal(error, retry_after_seconds(error.response.headers, now_epoch))


def retry_after_seconds(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Retry-After-Ms (precise, sent by flexserve and OpenAI) else Retry-After, which is
    seconds or an HTTP date (`now_epoch` is the wall clock, to turn a date into seconds)."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    raw = headers.get("retry-after")
    seconds = _number(raw)
    if seconds is not None or raw is None:
        return seconds
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - now_epoch)
    except (TypeError, ValueError):
        return None


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass
class Trail:
    """What happened to one request so far: attempts sent, time slept, and the budget."""

    policy: FlexPolicy
    started: float
    """The clock's reading when the first flex attempt was sent."""
    attempts: int = 0
    """Requests sent, flex attempts and the fallback alike."""
    waited_seconds: float = 0.0
    """Time slept between attempts (Retry-After or backoff)."""
    fell_back: bool = False
    _unannounced: int = field(default=0, repr=False)
    """Refusals so far that carried no Retry-After, for the backoff."""

    def delay_after(self, refusal: Refusal, now: float) -> float | None:
        """Seconds to sleep before the next flex attempt, or None to stop trying flex:
        the wait would end past the budget, so waiting could only cost time."""
        if refusal.retry_after is None:
            delay = self.policy.backoff_initial * 2.0**self._unannounced
            delay = min(delay, self.policy.backoff_max)
            self._unannounced += 1
        else:
            delay = refusal.retry_after
        delay = max(delay, self.policy.min_delay)
        if now + delay > self.started + self.policy.wait_budget:
            return None
        return delay

    def slept(self, seconds: float) -> None:
        self.waited_seconds += seconds

    def give_up(self, refusal: Refusal) -> FlexUnavailableError | None:
        """The error to raise under fallback="raise"; else None, and the fallback is next."""
        if self.policy.fallback == "raise":
            return FlexUnavailableError(
                refusal, self.attempts, self.waited_seconds, self.policy.wait_budget
            )
        self.fell_back = True
        return None


def flex_kwargs(kwargs: Mapping[str, Any], policy: FlexPolicy) -> dict[str, Any]:
    """The caller's create() arguments as a flex attempt."""
    headers = dict(kwargs.get("extra_headers") or {})
    if policy.max_wait_header is not None:
        headers[MAX_WAIT_HEADER] = f"{policy.max_wait_header:g}"
    return {**kwargs, "service_tier": "flex", "extra_headers": headers}


def default_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's create() arguments as the fallback at the default tier."""
    return {**kwargs, "service_tier": "default"}


def stream_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Streams ask for the final usage chunk (unless the caller chose), to know the cost."""
    options = kwargs.get("stream_options")
    return {**kwargs, "stream": True, "stream_options": options or {"include_usage": True}}


def check_request(kwargs: Mapping[str, Any]) -> None:
    """Refuse what the client decides itself, rather than silently overriding it."""
    if "service_tier" in kwargs:
        raise TypeError("FlexClient chooses service_tier itself (flex, then its fallback)")
    if "stream" in kwargs:
        raise TypeError("use FlexClient.stream() for a stream, chat() for one answer")
