"""Ledger rows: input once, output once, idempotent; a failing store never fails the
request it bills, and never loses its row (the outbox keeps it until the store is back)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from flexserve.backends.base import SamplingParams, TokenChunk
from flexserve.billing import Ledger
from flexserve.billing.outbox import Outbox
from flexserve.billing.prices import PriceCache, request_cost
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Submission
from flexserve.scheduling.tiers import TIERS
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
    def put_many(self, rows: Sequence[LedgerRow]) -> None:
        raise OSError("disk full")


def test_a_failing_outbox_falls_back_to_the_store_and_never_fails_the_request(
    outbox_path: Path,
) -> None:
    store = FlakyStore(failures=1)  # away for the batch: the row must go to the outbox
    settle_all(Ledger(Settings(), store, BrokenOutbox(outbox_path)), handle())
    assert [r.request_id for r in store.ledger("acme")] == ["req_1"]


class RefusingStore(MemoryStore):
    """Refuses every row of one request id, as a database refuses a value it cannot hold."""

    def __init__(self, refused_id: str) -> None:
        super().__init__()
        self.refused_id = refused_id

    def record(self, row: LedgerRow) -> bool:
        if row.request_id == self.refused_id:
            raise DataError("insert", {}, ValueError("value too long for type varchar(200)"))
        return super().record(row)


def test_a_row_the_store_always_refuses_is_set_aside_and_never_blocks_the_rest(
    outbox_path: Path,
) -> None:
    store = RefusingStore("req_bad")
    ledger = Ledger(Settings(), store, Outbox(outbox_path))
    ledger.outbox.put(ledger.row(handle(request_id="req_bad"), "completed"))
    for n in range(200):  # more than one page of pending rows queued behind it
        ledger.outbox.put(ledger.row(handle(request_id=f"req_{n}"), "completed"))
    passes = 0
    while not ledger.drain():
        passes += 1
        assert passes < 10, "the refused row keeps the outbox from draining"
    assert len(store.ledger("acme")) == 200
    assert len(ledger.outbox) == 0 and ledger.outbox.refused_count() == 1


def test_a_data_error_is_a_refused_row_not_a_store_outage(outbox_path: Path) -> None:
    ledger = Ledger(Settings(), RefusingStore("req_bad"), Outbox(outbox_path))
    ledger.outbox.put(ledger.row(handle(request_id="req_bad"), "completed"))
    ledger.drain()
    assert ledger._store_up  # an outage would make settles skip straight to the drainer


class UndeletableOutbox(Outbox):
    def remove(self, request_id: str) -> None:
        raise OSError("database is locked")


def test_a_failed_outbox_delete_after_billing_does_not_fail_the_request(
    outbox_path: Path,
) -> None:
    store = FlakyStore(failures=1)  # away for the batch: the drainer delivers the row
    settle_all(Ledger(Settings(), store, UndeletableOutbox(outbox_path)), handle())
    assert [r.request_id for r in store.ledger("acme")] == ["req_1"]
    again = Ledger(Settings(), store, Outbox(outbox_path))  # the next start
    assert len(again.outbox) == 1 and again.drain()  # delivered again: billed once
    assert [r.request_id for r in store.ledger("acme")] == ["req_1"]


class CountingOutbox(Outbox):
    """Records each batch it is asked to write; fails batches of more than one row while
    `fail_batches` is set (as a full disk fails a big write and not a small one)."""

    def __init__(self, path: Path, fail_batches: bool = False) -> None:
        super().__init__(path)
        self.batches: list[list[str]] = []
        self.fail_batches = fail_batches

    def put_many(self, rows: Sequence[LedgerRow]) -> None:
        self.batches.append([row.request_id for row in rows])
        if self.fail_batches and len(rows) > 1:
            raise OSError("disk full")
        super().put_many(rows)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def record_many(self, rows: Sequence[LedgerRow]) -> list[bool]:
        self.batches.append([row.request_id for row in rows])
        return super().record_many(rows)


def settle_together(ledger: Ledger, *jobs: JobHandle) -> None:
    """Settle all jobs at once (as concurrent requests do), then close the ledger."""

    async def run() -> None:
        await asyncio.gather(*(ledger.settle(job, "completed") for job in jobs))
        await ledger.close()

    asyncio.run(run())


def test_concurrent_settles_share_one_store_transaction_and_skip_the_outbox(
    outbox_path: Path,
) -> None:
    store = CountingStore()
    outbox = CountingOutbox(outbox_path)
    jobs = [handle(request_id=f"req_{n}") for n in range(20)]
    settle_together(Ledger(Settings(), store, outbox), *jobs)
    assert outbox.batches == []  # the store answers: it alone keeps the rows
    assert store.batches == [[f"req_{n}" for n in range(20)]]
    assert len(store.ledger("acme")) == 20
    assert len(Outbox(outbox_path)) == 0


def test_rows_settled_while_a_batch_is_written_go_in_the_next_batch(outbox_path: Path) -> None:
    store = CountingStore()
    outbox = CountingOutbox(outbox_path)
    ledger = Ledger(Settings(), store, outbox)

    async def run() -> None:
        first = asyncio.ensure_future(ledger.settle(handle(request_id="req_a"), "completed"))
        await asyncio.sleep(0)  # the first batch (req_a alone) is now being written
        await asyncio.gather(
            first, *(ledger.settle(handle(request_id=f"req_{n}"), "completed") for n in range(3))
        )
        await ledger.close()

    asyncio.run(run())
    assert store.batches == [["req_a"], ["req_0", "req_1", "req_2"]]
    assert outbox.batches == []
    assert sorted(r.request_id for r in store.ledger("acme")) == [
        "req_0",
        "req_1",
        "req_2",
        "req_a",
    ]


def test_a_failed_batch_write_keeps_each_of_its_rows_on_its_own(outbox_path: Path) -> None:
    store = FlakyStore(failures=100)  # away: every row must wait in the outbox
    outbox = CountingOutbox(outbox_path, fail_batches=True)
    jobs = [handle(request_id=f"req_{n}") for n in range(5)]
    settle_together(Ledger(Settings(), store, outbox), *jobs)
    assert outbox.batches[0] == [f"req_{n}" for n in range(5)]  # failed as a whole
    assert sorted(outbox.batches[1:]) == [[f"req_{n}"] for n in range(5)]  # then one by one
    assert len(Outbox(outbox_path)) == 5

    back = MemoryStore()
    settle_all(Ledger(Settings(), back, Outbox(outbox_path)))
    assert sorted(r.request_id for r in back.ledger("acme")) == [f"req_{n}" for n in range(5)]


def test_a_refused_row_in_a_batch_waits_alone_and_nothing_is_billed_twice(
    outbox_path: Path,
) -> None:
    store = RefusingStore("req_bad")  # refuses mid-batch, after storing the rows before it
    jobs = [handle(request_id=r) for r in ("req_0", "req_1", "req_bad", "req_2")]
    ledger = Ledger(Settings(), store, Outbox(outbox_path))
    settle_together(ledger, *jobs)
    assert sorted(r.request_id for r in store.ledger("acme")) == ["req_0", "req_1", "req_2"]
    assert [r.request_id for r in Outbox(outbox_path).pending()] == ["req_bad"]


def test_a_store_outage_during_a_batch_keeps_every_row_for_the_drainer(
    outbox_path: Path,
) -> None:
    store = FlakyStore(failures=1)  # the batch's transaction fails: the store is away
    settings = Settings(ledger_retry_interval=0.01)
    ledger = Ledger(settings, store, Outbox(outbox_path))
    jobs = [handle(request_id=f"req_{n}") for n in range(4)]

    async def run() -> None:
        await asyncio.gather(*(ledger.settle(job, "completed") for job in jobs))
        assert len(ledger.outbox) == 4  # durable before the answers end, store or not
        await ledger.start()  # the drainer: only now, so that it cannot deliver earlier
        for _ in range(1000):
            if not len(ledger.outbox):
                break
            await asyncio.sleep(0.01)
        await ledger.close()

    asyncio.run(run())
    assert sorted(r.request_id for r in store.ledger("acme")) == [f"req_{n}" for n in range(4)]


def test_a_settle_cancelled_while_its_batch_is_written_is_still_billed(
    outbox_path: Path,
) -> None:
    store = MemoryStore()
    ledger = Ledger(Settings(), store, Outbox(outbox_path))

    async def run() -> None:
        settling = asyncio.ensure_future(ledger.settle(handle(), "completed"))
        await asyncio.sleep(0)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        await ledger.close()

    asyncio.run(run())
    assert [r.request_id for r in store.ledger("acme")] == ["req_1"]


def test_the_price_cache_prices_every_model_and_tier_as_request_cost_does() -> None:
    settings = Settings(prices={"m": {"input": 1.0, "output": 3.0, "multipliers": {"flex": 0.25}}})
    book = PriceCache(settings)
    for model in ("m", "unpriced"):
        for tier in TIERS:
            for tokens in ((7, 0, 11), (1000, 0, 1)):
                expected = request_cost(settings, model, tier, *tokens)
                assert book.cost(model, tier, *tokens) == expected  # twice: once cached
                assert book.cost(model, tier, *tokens) == expected
    assert book.cost("m", "flex", 4, 0, 4).nanos == 4 * 250 + 4 * 750


def test_a_row_billed_after_the_writer_closed_is_still_written_and_answered(
    outbox_path: Path,
) -> None:
    """A settle that comes after `close` (the writer thread is gone) must neither hang its
    answer nor stop later rows: it is written on the loop."""
    store = MemoryStore()
    ledger = Ledger(Settings(), store, Outbox(outbox_path))

    async def run() -> None:
        await ledger.close()
        async with asyncio.timeout(5):
            await ledger.settle(handle(request_id="late_1"), "completed")
            await ledger.settle(handle(request_id="late_2"), "completed")

    asyncio.run(run())
    assert sorted(row.request_id for row in store.ledger("acme")) == ["late_1", "late_2"]
