"""Per-key rate limits: requests/min, tokens/min and requests in flight.

Sliding one-minute windows with an injected clock; tokens are counted as prompt +
max_tokens at admission and corrected to prompt + produced when the job settles. Over a
limit, a request gets `429 rate_limit_exceeded` with a Retry-After: the tenant's own
limit, unlike flex's `resource_unavailable` (the server's capacity). Answers carry
OpenAI's `x-ratelimit-*` headers, successful ones too.

The counts live in this process: with several replicas behind a load balancer each
enforces the limit on its own share, so a tenant may get up to replicas x limit. Exact
multi-replica limits would need a shared counter (e.g. in PostgreSQL); not done here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexserve.api.body import Header
from flexserve.api.validation import ValidChat
from flexserve.config import Settings
from flexserve.errors import RateLimitExceeded
from flexserve.store import KeyRecord

WINDOW = 60.0
CONCURRENCY_RETRY_AFTER = 1.0
"""A request in flight has no known end: ask the client to come back soon."""
HEADERS_STATE = "rate_limit_headers"
REQUEST_STATE = "rate_limited_request"


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass(eq=False)  # compared by identity: two admissions may look alike
class _Admitted:
    at: float
    tokens: int
    prompt_tokens: int
    expired: bool = False
    """Out of its key's window: a settle no longer corrects the window's tokens. A flag,
    not a search: a busy key's window holds a minute of admissions (60,000 at 1,000/s)."""


@dataclass
class _KeyWindow:
    """One key's admissions in the last minute, and its requests in flight."""

    admitted: deque[_Admitted] = field(default_factory=deque)
    tokens: int = 0
    in_flight: set[str] = field(default_factory=set)

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0].at <= now - WINDOW:
            gone = self.admitted.popleft()
            gone.expired = True
            self.tokens -= gone.tokens


@dataclass(frozen=True)
class Verdict:
    headers: dict[str, str]
    retry_after: float | None = None
    """None = admitted."""
    reason: str = ""


class Windows:
    """The pure core: admissions per key over a sliding minute, at times it is given."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyWindow] = {}
        self._requests: dict[str, tuple[_KeyWindow, _Admitted]] = {}
        """In flight: admitted, and the HTTP exchange not over."""
        self._unsettled: dict[str, tuple[_KeyWindow, _Admitted]] = {}
        """Admitted, tokens not yet corrected. A job settles after its exchange ends when
        its client leaves, so this outlives `_requests`; in admission order, and dropped
        once out of the window (a job cancelled before it started never settles)."""

    def admit(
        self, key_id: str, limits: Limits, request_id: str, prompt: int, tokens: int, now: float
    ) -> Verdict:
        window = self._keys.setdefault(key_id, _KeyWindow())
        window.expire(now)
        refusal = _refusal(window, limits, tokens, now)
        if refusal is not None:
            reason, retry_after = refusal
            return Verdict(_headers(window, limits, now), retry_after, reason)
        admitted = _Admitted(now, tokens, prompt)
        window.admitted.append(admitted)
        window.tokens += tokens
        window.in_flight.add(request_id)
        self._requests[request_id] = self._unsettled[request_id] = (window, admitted)
        self._forget_settlements_before(now - WINDOW)
        return Verdict(_headers(window, limits, now))

    def _forget_settlements_before(self, moment: float) -> None:
        while self._unsettled:
            request_id, (_, admitted) = next(iter(self._unsettled.items()))
            if admitted.at > moment:
                return
            del self._unsettled[request_id]

    def settled(self, request_id: str, produced: int) -> None:
        """Count what the job really used instead of its max_tokens."""
        entry = self._unsettled.pop(request_id, None)
        if entry is None:
            return
        window, admitted = entry
        used = admitted.prompt_tokens + produced
        if not admitted.expired:  # still inside the window
            window.tokens += used - admitted.tokens
        admitted.tokens = used

    def in_flight(self) -> int:
        """Requests admitted and not yet finished, over all keys."""
        return len(self._requests)

    def finished(self, request_id: str) -> None:
        """The HTTP exchange ended (answered, refused, or the client left)."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            entry[0].in_flight.discard(request_id)


def _refusal(
    window: _KeyWindow, limits: Limits, tokens: int, now: float
) -> tuple[str, float] | None:
    """Why the request may not start now and when to retry, or None."""
    concurrent = limits.concurrent_requests
    if concurrent is not None and len(window.in_flight) >= concurrent:
        return f"{concurrent} concurrent requests", CONCURRENCY_RETRY_AFTER
    rpm = limits.requests_per_minute
    if rpm is not None and len(window.admitted) >= rpm:
        return f"{rpm} requests per minute", _until_requests_at_most(window, rpm - 1, now)
    tpm = limits.tokens_per_minute
    if tpm is not None and window.tokens + tokens > tpm:
        return f"{tpm} tokens per minute", _until_tokens_at_most(window, tpm - tokens, now)
    return None


def _until_requests_at_most(window: _KeyWindow, count: int, now: float) -> float:
    """Seconds until at most `count` admissions are left in the window."""
    expiring = len(window.admitted) - count
    if expiring <= 0:
        return 0.0
    return max(window.admitted[expiring - 1].at + WINDOW - now, 0.0)


def _until_tokens_at_most(window: _KeyWindow, target: int, now: float) -> float:
    """Seconds until at most `target` tokens are left in the window."""
    if target < 0:
        return WINDOW  # more than the whole limit: it never fits; a minute is honest enough
    total = window.tokens
    if total <= target:
        return 0.0
    for admitted in window.admitted:
        total -= admitted.tokens
        if total <= target:
            return max(admitted.at + WINDOW - now, 0.0)
    return WINDOW


def _headers(window: _KeyWindow, limits: Limits, now: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.requests_per_minute is not None:
        limit = limits.requests_per_minute
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(max(limit - len(window.admitted), 0))
        headers["x-ratelimit-reset-requests"] = _duration(_until_requests_at_most(window, 0, now))
    if limits.tokens_per_minute is not None:
        limit = limits.tokens_per_minute
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(limit - window.tokens, 0))
        headers["x-ratelimit-reset-tokens"] = _duration(_until_tokens_at_most(window, 0, now))
    return headers


def _duration(seconds: float) -> str:
    """OpenAI's style: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(round(seconds * 1000, 6))}ms"
    minutes, rest = divmod(seconds, 60)
    text = (f"{rest:.3f}".rstrip("0").rstrip(".") or "0") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def key_limits(key: KeyRecord, settings: Settings) -> Limits:
    """The key's own limits; those it does not set come from the config's defaults."""
    return Limits(
        requests_per_minute=key.requests_per_minute or settings.key_requests_per_minute,
        tokens_per_minute=key.tokens_per_minute or settings.key_tokens_per_minute,
        concurrent_requests=key.concurrent_requests or settings.key_concurrent_requests,
    )


class RateLimiter:
    """The HTTP side: admits a validated request or raises `RateLimitExceeded`."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float],
        refused: Callable[[str], None] = lambda tier: None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.windows = Windows()
        self._refused = refused
        """Called with the tier of each request refused (/metrics counts them)."""

    def admit(self, request: Request, key: KeyRecord, valid: ValidChat) -> None:
        request_id: str = request.state.request_id
        prompt = len(valid.prompt_tokens)
        tokens = prompt + valid.sampling.max_tokens
        limits = key_limits(key, self.settings)
        verdict = self.windows.admit(key.key_id, limits, request_id, prompt, tokens, self.clock())
        setattr(request.state, HEADERS_STATE, verdict.headers)
        if verdict.retry_after is not None:
            self._refused(valid.tier)
            raise RateLimitExceeded(
                f"Rate limit reached for this API key: {verdict.reason}. "
                f"Try again in {verdict.retry_after:.1f}s.",
                retry_after=verdict.retry_after,
            )
        setattr(request.state, REQUEST_STATE, request_id)

    def settled(self, request_id: str, produced: int) -> None:
        self.windows.settled(request_id, produced)


class RateLimitMiddleware:
    """Adds the `x-ratelimit-*` headers the limiter chose to the response, and frees the
    request's concurrency place when the exchange ends, however it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_limit_headers(message.get("headers", []), state)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            exchange_ended(scope)


def with_limit_headers(headers: list[Header], state: dict[str, Any]) -> list[Header]:
    """A response's headers with the `x-ratelimit-*` ones the limiter chose, if any."""
    chosen: dict[str, str] | None = state.get(HEADERS_STATE)
    if not chosen:
        return headers
    return [*headers, *((k.encode(), v.encode()) for k, v in chosen.items())]


def exchange_ended(scope: Scope) -> None:
    """Frees the request's concurrency place, if the limiter gave it one."""
    request_id = scope["state"].get(REQUEST_STATE)
    if request_id is not None:
        limiter: RateLimiter = scope["app"].state.flexserve.limits
        limiter.windows.finished(request_id)
