"""Ledger rows: input once, output once, idempotent; a failing store never fails the
request it bills, and never loses its row (the outbox keeps it until the store is back)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from flexserve.backends.base import SamplingParams, TokenChunk
from flexserve.billing import Ledger
from flexserve.billing.outbox import Outbox
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Submission
from flexserve.store import LedgerRow, MemoryStore


def handle(
    tier: str = "flex", produced: int = 5, preemptions: int = 2, request_id: str = "req_1"
) -> JobHandle:
    sub = Submission(request_id, "acme", tier, "m", (1, 2, 3, 4), SamplingParams(max_tokens=9), 9)  # type: ignore[arg-type]
    job = JobHandle(sub, arrival=0.0)
    job.produced = [TokenChunk(i, "x") for i in range(produced)]
    job.preemptions = preemptions
    return job


class FlakyStore(MemoryStore):
    """Fails its next `failures` writes with `error`."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or OperationalError("insert", {}, ConnectionError("database away"))

    def record(self, row: LedgerRow) -> bool:
        if self.failures:
            self.failures -= 1
            raise self.error
        return super().record(row)


@pytest.fixture
def outbox_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "outbox.db"


def settle_all(ledger: Ledger, *jobs: JobHandle) -> None:
    """Settle in one event loop, then close the ledger (which drains once more)."""

    async def run() -> None:
        for job in jobs:
            await ledger.settle(job, "completed")
        await ledger.close()

    asyncio.run(run())


def test_preempted_job_bills_its_input_and_output_once(outbox_path: Path) -> None:
    store = MemoryStore()
    settle_all(Ledger(Settings(), store, Outbox(outbox_path)), handle(), handle())
    (row,) = store.ledger("acme")
    assert (row.input_tokens, row.output_tokens, row.preemptions) == (4, 5, 2)
    # default prices: 0.10 in / 0.40 out per 1M tokens, flex at half: 0.05 / 0.20
    assert row.cost_nanos == 4 * 50 + 5 * 200
    assert row.list_cost_nanos == 2 * row.cost_nanos


def test_shed_and_failed_cost_nothing(outbox_path: Path) -> None:
    store = MemoryStore()
    ledger = Ledger(Settings(), store, Outbox(outbox_path))

    async def run() -> None:
        for outcome in ("shed", "failed", "overloaded"):
            await ledger.settle(handle(), outcome)  # type: ignore[arg-type]
        await ledger.close()

    asyncio.run(run())
    assert store.ledger("acme") == []
    assert len(Outbox(outbox_path)) == 0


def test_a_row_the_store_cannot_take_waits_in_the_outbox_across_a_restart(
    outbox_path: Path,
) -> None:
    dead = FlakyStore(failures=100)
    settle_all(Ledger(Settings(), dead, Outbox(outbox_path)), handle())  # does not raise
    assert dead.ledger("acme") == []
    assert len(Outbox(outbox_path)) == 1  # on disk, for the next start

    back = MemoryStore()
    settle_all(Ledger(Settings(), back, Outbox(outbox_path)))
    assert [r.request_id for r in back.ledger("acme")] == ["req_1"]
    assert len(Outbox(outbox_path)) == 0


def test_the_drainer_delivers_once_the_store_is_back(outbox_path: Path) -> None:
    flaky = FlakyStore(failures=3)
    settings = Settings(ledger_retry_interval=0.01)
    ledger = Ledger(settings, flaky, Outbox(outbox_path))

    async def run() -> None:
        await ledger.start()
        await ledger.settle(handle(request_id="req_1"), "completed")  # fails: store away
        await ledger.settle(handle(request_id="req_2"), "completed")  # not even tried
        for _ in range(1000):  # the drainer retries every 10 ms
            if not len(ledger.outbox):
                break
            await asyncio.sleep(0.01)
        await ledger.close()

    asyncio.run(run())
    assert sorted(r.request_id for r in flaky.ledger("acme")) == ["req_1", "req_2"]


def test_a_row_already_in_the_store_is_not_billed_again(outbox_path: Path) -> None:
    """A crash between the store's insert and the outbox's delete delivers twice."""
    store = MemoryStore()
    outbox = Outbox(outbox_path)
    ledger = Ledger(Settings(), store, outbox)
    row = ledger.row(handle(), "completed")
    store.record(row)
    outbox.put(row)
    assert ledger.drain()
    assert store.ledger("acme") == [row]


def test_an_integrity_error_other_than_a_duplicate_keeps_the_row_and_the_rest_flows(
    outbox_path: Path,
) -> None:
    broken = IntegrityError("insert", {}, ValueError("NOT NULL constraint failed"))
    store = FlakyStore(failures=1, error=broken)
    ledger = Ledger(Settings(), store, Outbox(outbox_path))
    ledger.outbox.put(ledger.row(handle(request_id="req_bad"), "completed"))
    ledger.outbox.put(ledger.row(handle(request_id="req_ok"), "completed"))
    assert not ledger.drain()  # not "already billed": kept, to be retried
    assert [r.request_id for r in store.ledger("acme")] == ["req_ok"]
    assert len(ledger.outbox) == 1
    assert ledger.drain()
    assert sorted(r.request_id for r in store.ledger("acme")) == ["req_bad", "req_ok"]


class BrokenOutbox(Outbox):
    def put(self, row: LedgerRow) -> None:
        raise OSError("disk full")


def test_a_failing_outbox_falls_back_to_the_store_and_never_fails_the_request(
    outbox_path: Path,
) -> None:
    store = MemoryStore()
    settle_all(Ledger(Settings(), store, BrokenOutbox(outbox_path)), handle())
    assert [r.request_id for r in store.ledger("acme")] == ["req_1"]
