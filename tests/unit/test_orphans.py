"""Recognising a retry, and keeping an orphaned answer for it (api/retries.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from flexserve.api.retries import Orphan, Orphans, attempt_key, is_retry, may_be_retried

BODY = b'{"model": "m", "messages": []}'


def test_a_retry_is_marked_by_the_sdk_retry_count_or_an_idempotency_key() -> None:
    assert not is_retry({"x-stainless-retry-count": "0"})
    assert not is_retry({})
    assert not is_retry({"x-stainless-retry-count": "x"})
    assert not is_retry({"x-stainless-retry-count": "²"})
    assert is_retry({"x-stainless-retry-count": "9" * 5000})
    assert is_retry({"x-stainless-retry-count": "1"})
    assert is_retry({"idempotency-key": "k"})


def test_only_a_client_that_says_it_retries_may_be_retried() -> None:
    assert may_be_retried({"x-stainless-retry-count": "0"})
    assert may_be_retried({"idempotency-key": "k"})
    assert not may_be_retried({})


def test_the_attempt_key_is_the_body_and_the_callers_key() -> None:
    assert attempt_key({}, BODY) == attempt_key({"x-stainless-retry-count": "2"}, BODY)
    assert attempt_key({}, BODY) != attempt_key({}, BODY + b" ")
    assert attempt_key({"idempotency-key": "a"}, BODY) != attempt_key({}, BODY)
    assert attempt_key({"idempotency-key": "a"}, BODY) != attempt_key(
        {"idempotency-key": "a"}, BODY + b" "
    )


async def _orphan(given_up: list[str], name: str, event: asyncio.Event | None = None) -> Orphan:
    answer: asyncio.Task[dict[str, Any]] = asyncio.ensure_future(asyncio.sleep(0, {}))

    def give_up() -> None:
        given_up.append(name)
        if event is not None:
            event.set()

    return Orphan(name, answer, give_up)


def test_an_orphan_is_adopted_once_and_only_by_its_tenant() -> None:
    async def run() -> tuple[Orphan | None, Orphan | None, Orphan | None, list[str]]:
        given_up: list[str] = []
        orphans = Orphans()
        orphans.leave("t", "k", await _orphan(given_up, "req_1"), grace=60)
        other_tenant = orphans.adopt("u", "k")
        adopted = orphans.adopt("t", "k")
        again = orphans.adopt("t", "k")
        return other_tenant, adopted, again, given_up

    other_tenant, adopted, again, given_up = asyncio.run(run())
    assert other_tenant is None and again is None
    assert adopted is not None and adopted.request_id == "req_1"
    assert given_up == []


def test_an_unclaimed_orphan_is_given_up_after_its_grace() -> None:
    async def run() -> tuple[list[str], int]:
        given_up: list[str] = []
        orphans = Orphans()
        gone = asyncio.Event()
        orphans.leave("t", "k", await _orphan(given_up, "req_1", gone), grace=0.01)
        await asyncio.wait_for(gone.wait(), 10)
        return given_up, len(orphans)

    given_up, left = asyncio.run(run())
    assert given_up == ["req_1"] and left == 0


def test_a_newer_orphan_for_the_same_key_replaces_the_older() -> None:
    async def run() -> tuple[list[str], Orphan | None]:
        given_up: list[str] = []
        orphans = Orphans()
        orphans.leave("t", "k", await _orphan(given_up, "req_1"), grace=60)
        orphans.leave("t", "k", await _orphan(given_up, "req_2"), grace=60)
        return given_up, orphans.adopt("t", "k")

    given_up, adopted = asyncio.run(run())
    assert given_up == ["req_1"]
    assert adopted is not None and adopted.request_id == "req_2"
