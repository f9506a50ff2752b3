"""Ledger rows: input once, output once, idempotent, and a failing store never fails
the request it bills."""

from __future__ import annotations

import asyncio

from flexserve.backends.base import SamplingParams, TokenChunk
from flexserve.billing import Ledger
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Submission
from flexserve.store import LedgerRow, MemoryStore


def handle(tier: str = "flex", produced: int = 5, preemptions: int = 2) -> JobHandle:
    sub = Submission("req_1", "acme", tier, "m", (1, 2, 3, 4), SamplingParams(max_tokens=9), 9)  # type: ignore[arg-type]
    job = JobHandle(sub, arrival=0.0)
    job.produced = [TokenChunk(i, "x") for i in range(produced)]
    job.preemptions = preemptions
    return job


class FlakyStore(MemoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def record(self, row: LedgerRow) -> bool:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database went away")
        return super().record(row)


def test_preempted_job_bills_its_input_and_output_once() -> None:
    store = MemoryStore()
    ledger = Ledger(Settings(), store)
    asyncio.run(ledger.settle(handle(), "completed"))
    asyncio.run(ledger.settle(handle(), "completed"))  # a retried settle
    (row,) = store.ledger("acme")
    assert (row.input_tokens, row.output_tokens, row.preemptions) == (4, 5, 2)
    # default prices: 0.10 in / 0.40 out per 1M tokens, flex at half: 0.05 / 0.20
    assert row.cost_nanos == 4 * 50 + 5 * 200
    assert row.list_cost_nanos == 2 * row.cost_nanos


def test_shed_and_failed_cost_nothing() -> None:
    store = MemoryStore()
    ledger = Ledger(Settings(), store)
    for outcome in ("shed", "failed", "overloaded"):
        asyncio.run(ledger.settle(handle(), outcome))  # type: ignore[arg-type]
    assert store.ledger("acme") == []


def test_a_briefly_failing_store_is_retried_and_a_dead_one_does_not_raise() -> None:
    flaky = FlakyStore(failures=2)
    asyncio.run(Ledger(Settings(), flaky).settle(handle(), "completed"))
    assert len(flaky.ledger("acme")) == 1
    dead = FlakyStore(failures=100)
    asyncio.run(Ledger(Settings(), dead).settle(handle(), "completed"))
    assert dead.ledger("acme") == []
