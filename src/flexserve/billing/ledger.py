"""Turns a settled job into exactly one ledger row, durably, off the event loop.

Path of a row: straight to the store while it answers (its commit is the row's
durability, before the answer's last byte, so usage reads see it when the answer ends);
while the store is away or refuses, the local outbox (fsync'd) keeps it, and the drainer
delivers it when the store is back. The request id makes every delivery idempotent.

Group commit: rows of requests that settle while the writer is busy wait for it and go
to the store together, in one transaction, and each request waits for its own batch's
commit: a hundred concurrent requests pay one commit between them, not a hundred.

Durability is the store's: PostgreSQL's commit is on disk; the SQLite store (WAL,
`synchronous=NORMAL`, like every other record in it) survives a crash of the process,
not a power cut. The outbox is for outages, so it syncs each commit: a row it keeps may
wait there for hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, TypeVar

from flexserve.billing.outbox import FILE_NAME, Outbox
from flexserve.billing.prices import PriceCache
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Outcome, settled_now
from flexserve.store import STORE_AWAY, LedgerRow, Store

log = logging.getLogger("flexserve.billing")

BILLED: frozenset[Outcome] = frozenset({"completed", "cancelled"})
"""Shed, overloaded and failed requests cost nothing."""
WRITER_THREADS = 2
"""Ledger writes have their own threads: auth lookups or tokenizing cannot starve them."""
Delivery = Literal["billed", "already_billed", "refused", "store_away", "not_removed"]
SET_ASIDE_AFTER = 5
"""Refusals of one row before it moves to the outbox's `refused` table for an operator."""
R = TypeVar("R")


class Ledger:
    def __init__(self, settings: Settings, store: Store, outbox: Outbox | None = None) -> None:
        self.settings = settings
        self.store = store
        self.prices = PriceCache(settings)
        if outbox is None:
            busy_timeout = settings.sqlite_busy_timeout
            outbox = Outbox(settings.data_dir / FILE_NAME, busy_timeout=busy_timeout)
        self.outbox = outbox
        self._writer = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="ledger")
        self._wake = asyncio.Event()
        self._store_up = True
        self._drainer: asyncio.Task[None] | None = None
        self._queued: list[tuple[LedgerRow, asyncio.Future[None]]] = []
        """Rows settled while a batch was being written: the next batch."""
        self._writing: asyncio.Future[None] | None = None
        """Set while a batch is in the writer thread; resolves when none is left."""

    async def start(self) -> None:
        """Deliver what an earlier run (or outage) left in the outbox, and keep doing so."""
        self._drainer = asyncio.create_task(self._drain_forever(), name="ledger-drainer")

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._writing is not None:  # rows settled just before: let them reach disk
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)
        with contextlib.suppress(Exception):  # whatever is left waits for the next start
            await self._in_writer(self.drain)
        await asyncio.to_thread(self._writer.shutdown, True)
        self.outbox.close()

    async def settle(self, handle: JobHandle, outcome: Outcome) -> None:
        """Bill the job and wait until its row is committed (or kept for the drainer)."""
        await self.bill(handle, outcome)

    def bill(self, handle: JobHandle, outcome: Outcome) -> asyncio.Future[None]:
        """Queue the job's row, if billable; the future is done once it is committed
        (or kept in the outbox). Not a coroutine, so that the runtime needs no task per
        settled job: the answer waits on this future itself."""
        if outcome not in BILLED:
            return settled_now()
        try:
            row = self.row(handle, outcome)
        except Exception:  # a bad price table must not fail a finished request
            log.exception("cannot price request_id=%s", handle.request_id)
            return settled_now()
        loop = asyncio.get_running_loop()
        committed = loop.create_future()
        self._queued.append((row, committed))
        if self._writing is None:  # at the loop's next turn: settles of this turn join
            self._writing = loop.create_future()
            loop.call_soon(self._write_queued, loop)
        return committed

    def _write_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the queued rows to the writer as one batch. Its end comes back as one
        callback on the loop (no task, no asyncio future between): on the answer's
        path, each hop was a turn of the event loop before the answer could go out."""
        batch, self._queued = self._queued, []
        rows = [row for row, _ in batch]
        try:
            done = self._writer.submit(self._commit, rows)
        except Exception:  # the writer is gone (a bill after close): write here, blocking
            log.warning("ledger writer unavailable: writing %d rows on the loop", len(rows))
            self._written(loop, batch, _now(self._commit, rows))
            return

        def back_on_the_loop(_: Future[bool]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._written, loop, batch, done)

        done.add_done_callback(back_on_the_loop)

    def _written(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[LedgerRow, asyncio.Future[None]]],
        done: Future[bool],
    ) -> None:
        """A batch is written: wake its waiters, then write the rows queued meanwhile."""
        try:
            needs_drainer = done.result()
        except Exception:  # _commit handles its failures; this is a bug, not an outage
            log.exception("ledger batch of %d rows failed", len(batch))
            needs_drainer = True
        if needs_drainer:
            self._wake.set()
        for _, committed in batch:
            if not committed.done():  # a waiter cancelled: its row is written all the same
                committed.set_result(None)
        if self._queued:
            self._write_queued(loop)
        elif self._writing is not None:
            self._writing.set_result(None)
            self._writing = None

    def _commit(self, rows: list[LedgerRow]) -> bool:
        """Bill the rows in the store, or keep them in the outbox while it is away or
        refuses. Blocking. True if the drainer has rows to deliver."""
        if self._store_up and self._record_many(rows):
            return False
        try:
            self.outbox.put_many(rows)
        except Exception:  # each row on its own: a failure of one must not lose the rest
            log.exception("ledger outbox batch write failed, %d rows", len(rows))
            return any([self._keep(row) for row in rows])
        return True

    def _keep(self, row: LedgerRow) -> bool:
        """One row the batch could not keep: the outbox alone, else the store directly
        (the local disk failed: it is all that is left). True if it waits in the outbox."""
        try:
            self.outbox.put(row)
        except Exception:
            log.exception("ledger outbox write failed request_id=%s", row.request_id)
            self._record_without_outbox(row)
            return False
        return True

    def _record_many(self, rows: list[LedgerRow]) -> bool:
        """Store the rows in one transaction. Blocking. False if the store is away, or
        refused the transaction (a row it cannot take fails them all: the drainer then
        delivers each on its own, so only that row waits and is counted refused)."""
        try:
            inserted = self.store.record_many(rows)
        except STORE_AWAY as error:
            self._store_up = False
            log.warning("store away (%s): %d rows kept in outbox", error, len(rows))
            return False
        except Exception as error:
            log.warning("store refused a batch of %d rows (%s)", len(rows), type(error).__name__)
            return False
        for row, new in zip(rows, inserted, strict=True):
            _log_billed(row, new)
        return True

    def drain(self) -> bool:
        """Deliver outbox rows, oldest first; True when none is left. Blocking."""
        while rows := self.outbox.pending():
            refused = False
            for row in rows:
                delivery = self._deliver(row)
                if delivery in ("store_away", "not_removed"):
                    return False
                refused = refused or delivery == "refused"
            if refused:  # kept for a later pass, after the rows behind it
                return False
        return True

    def _deliver(self, row: LedgerRow) -> Delivery:
        """Store one outbox row. Blocking. Only a duplicate request id means "already
        billed" (the store skips it); an unreachable database keeps every row for later;
        a row the database refuses is retried a few times, then set aside."""
        try:
            inserted = self.store.record(row)
        except STORE_AWAY as error:  # retry every row later; a refused row alone is retried
            self._store_up = False
            log.warning("store away request_id=%s (%s), kept in outbox", row.request_id, error)
            return "store_away"
        except Exception as error:
            self._refused(row, error)
            return "refused"
        self._store_up = True
        try:
            self.outbox.remove(row.request_id)
        except Exception:  # billed already; a later drain re-delivers it, a no-op
            log.warning("outbox delete failed request_id=%s", row.request_id)
            return "not_removed"
        _log_billed(row, inserted)
        return "billed" if inserted else "already_billed"

    def _refused(self, row: LedgerRow, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self.outbox.refused(row.request_id, reason, SET_ASIDE_AFTER):
            log.error(
                "ledger row set aside after %d refusals request_id=%s (%s)",
                SET_ASIDE_AFTER,
                row.request_id,
                type(error).__name__,
            )
        else:
            log.warning("ledger row refused request_id=%s (%s)", row.request_id, reason)

    def _record_without_outbox(self, row: LedgerRow) -> None:
        try:
            self.store.record(row)
        except Exception:
            log.exception("ledger row lost request_id=%s tier=%s", row.request_id, row.tier)

    async def _drain_forever(self) -> None:
        while True:
            self._wake.clear()  # before draining: a row put meanwhile wakes the next pass
            try:
                drained = await self._in_writer(self.drain)
            except Exception:  # the outbox file itself failed: keep trying
                log.exception("ledger outbox drain failed")
                drained = False
            retry = None if drained else self.settings.ledger_retry_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry):
                    await self._wake.wait()

    async def _in_writer(self, function: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._writer, function, *args)

    def row(self, handle: JobHandle, outcome: Outcome) -> LedgerRow:
        """Input once, each produced token once, however often the job was preempted."""
        sub = handle.submission
        input_tokens = handle.prompt_token_count
        output_tokens = len(handle.produced)
        cost = self.prices.cost(sub.model, sub.tier, input_tokens, 0, output_tokens)
        return LedgerRow(
            request_id=sub.request_id,
            tenant=sub.tenant,
            model=sub.model,
            tier=sub.tier,
            input_tokens=input_tokens,
            cached_input_tokens=0,
            output_tokens=output_tokens,
            cost_nanos=cost.nanos,
            list_cost_nanos=cost.list_nanos,
            outcome=outcome,
            preemptions=handle.preemptions,
            created_at=time.time(),
        )


def _now(function: Callable[[list[LedgerRow]], bool], rows: list[LedgerRow]) -> Future[bool]:
    """`function(rows)` run here, as a done future (what the writer thread would give)."""
    done: Future[bool] = Future()
    try:
        done.set_result(function(rows))
    except Exception as error:
        done.set_exception(error)
    return done


def _log_billed(row: LedgerRow, new: bool) -> None:
    log.info(
        "billed request_id=%s tier=%s input=%d output=%d nanos=%d new=%s",
        row.request_id,
        row.tier,
        row.input_tokens,
        row.output_tokens,
        row.cost_nanos,
        new,
    )
