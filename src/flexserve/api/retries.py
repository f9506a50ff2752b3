"""Retried requests are answered once: a non-streaming answer whose client left after its
job started is kept for a while, and the client's retry adopts it instead of starting
(and paying for) a second job. See docs/retries.md.

A retry is recognised by what the official client really sends: the same body with
`X-Stainless-Retry-Count` >= 1, or the same `Idempotency-Key` (which the SDK does not
send by itself; a caller may, with `extra_headers`). Keys are per tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

IDEMPOTENCY_HEADER = "idempotency-key"
RETRY_COUNT_HEADER = "x-stainless-retry-count"

Answer = asyncio.Future[dict[str, Any]]
"""A job's collected answer (the JSON body), or its error."""


def attempt_key(headers: Mapping[str, str], body: bytes) -> str:
    """What identifies this request across the client's attempts: the body, and the
    caller's key if any (a key sent again with another body is another request)."""
    return headers.get(IDEMPOTENCY_HEADER, "") + ":" + hashlib.sha256(body).hexdigest()


def may_be_retried(headers: Mapping[str, str]) -> bool:
    """A client that retries says so: the SDK sends its retry count on every attempt.
    Other clients (curl, load generators) that hang up have gone for good."""
    return bool(headers.get(IDEMPOTENCY_HEADER)) or RETRY_COUNT_HEADER in headers


def is_retry(headers: Mapping[str, str]) -> bool:
    """An explicit key marks every attempt; without one, only the SDK's retries count."""
    if headers.get(IDEMPOTENCY_HEADER):
        return True
    count = headers.get(RETRY_COUNT_HEADER, "0")
    # No int(): a header of 5,000 digits must not raise.
    return count.isascii() and count.isdigit() and count.strip("0") != ""


@dataclass
class Orphan:
    """An answer still being produced (or produced) for a client that left."""

    request_id: str
    """The ledger key: the adopting retry answers under this id."""
    answer: Answer
    on_unclaimed: Callable[[], None]
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Orphans:
    """Orphaned answers by (tenant, attempt key), each kept for a grace period."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], Orphan] = {}

    def leave(self, tenant: str, key: str, orphan: Orphan, grace: float) -> None:
        """Keep `orphan` for a retry; unclaimed after `grace` s, `on_unclaimed` runs."""
        slot = (tenant, key)
        earlier = self._kept.pop(slot, None)
        if earlier is not None:  # two attempts left: the newer one is what a retry wants
            _give_up(earlier)
        loop = asyncio.get_running_loop()
        orphan.timer = loop.call_later(grace, self._expire_if_kept, slot, orphan)
        self._kept[slot] = orphan

    def adopt(self, tenant: str, key: str) -> Orphan | None:
        orphan = self._kept.pop((tenant, key), None)
        if orphan is not None and orphan.timer is not None:
            orphan.timer.cancel()
        return orphan

    def __len__(self) -> int:
        return len(self._kept)

    def _expire_if_kept(self, slot: tuple[str, str], orphan: Orphan) -> None:
        if self._kept.get(slot) is orphan:
            del self._kept[slot]
            _give_up(orphan)


def _give_up(orphan: Orphan) -> None:
    if orphan.timer is not None:
        orphan.timer.cancel()
    orphan.on_unclaimed()
