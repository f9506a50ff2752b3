"""How a job ends when it does not end with its answer: the errors its client gets, and
what it is billed (pure functions of the job; the runtime decides when)."""

from __future__ import annotations

from typing import Literal

from flexserve.backends.base import EngineRefused
from flexserve.errors import (
    FlexserveError,
    InvalidRequest,
    Overloaded,
    RateLimitExceeded,
    ResourceUnavailable,
)
from flexserve.runtime.events import JobHandle

Outcome = Literal["completed", "cancelled", "failed", "shed", "overloaded"]

SHUTDOWN_RETRY_AFTER = 5.0
"""Retry-After on the 503s of a draining server (another replica, or this one restarted)."""


def runtime_failed(reason: str) -> FlexserveError:
    """A 500 (`server_error`): the server is about to exit; retrying elsewhere may work."""
    return FlexserveError(f"The server's scheduler stopped ({reason}); retry shortly.")


def shutting_down() -> Overloaded:
    """The 503 of a draining server: a job refused or ended by the shutdown."""
    return Overloaded(
        "The server is shutting down; retry shortly.", retry_after=SHUTDOWN_RETRY_AFTER
    )


def cut_outcome(handle: JobHandle) -> Outcome:
    """A job cut by the server (shutdown, a dead runtime) is billed for what its client
    received: a stream's tokens so far; a JSON answer that never went out, nothing."""
    received = handle.submission.stream and bool(handle.produced)
    return "cancelled" if received else "failed"


def refusal(refused: EngineRefused) -> FlexserveError:
    """An upstream's refusal as ours: its 429 keeps its Retry-After, a 4xx is a 400."""
    if refused.status == 429 and refused.code == "rate_limit_exceeded":
        return RateLimitExceeded(
            f"The upstream engine's rate limit: {refused.message}",
            retry_after=refused.retry_after or 1.0,
        )
    if refused.status == 429:
        return ResourceUnavailable(
            f"The upstream engine refused: {refused.message}",
            retry_after=refused.retry_after or 1.0,
        )
    return InvalidRequest(f"The upstream engine refused the request: {refused.message}")


def busy_message(reason: str) -> str:
    return (
        "Flex capacity is not available right now "
        f"({reason}); retry later or use service_tier='default'."
    )
