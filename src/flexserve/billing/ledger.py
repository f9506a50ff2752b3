"""Turns a settled job into exactly one ledger row, durably, off the event loop.

Path of a row: the local outbox (on disk before the answer's last byte), then the store.
While the store answers, a row is delivered at once, so usage reads see it when the
answer ends; while it is away, rows wait in the outbox and the drainer delivers them when
it is back. The request id makes every delivery idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from flexserve.billing.outbox import FILE_NAME, Outbox
from flexserve.billing.prices import request_cost
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Outcome
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
        if outbox is None:
            busy_timeout = settings.sqlite_busy_timeout
            outbox = Outbox(settings.data_dir / FILE_NAME, busy_timeout=busy_timeout)
        self.outbox = outbox
        self._writer = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="ledger")
        self._wake = asyncio.Event()
        self._store_up = True
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Deliver what an earlier run (or outage) left in the outbox, and keep doing so."""
        self._drainer = asyncio.create_task(self._drain_forever(), name="ledger-drainer")

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        with contextlib.suppress(Exception):  # whatever is left waits for the next start
            await self._in_writer(self.drain)
        await asyncio.to_thread(self._writer.shutdown, True)
        self.outbox.close()

    async def settle(self, handle: JobHandle, outcome: Outcome) -> None:
        if outcome not in BILLED:
            return
        try:
            row = self.row(handle, outcome)
        except Exception:  # a bad price table must not fail a finished request
            log.exception("cannot price request_id=%s", handle.request_id)
            return
        try:
            await self._in_writer(self.outbox.put, row)
        except Exception:  # the local disk failed: the store directly is all that is left
            log.exception("ledger outbox write failed request_id=%s", row.request_id)
            await self._in_writer(self._record_without_outbox, row)
            return
        if not self._store_up:  # the drainer is retrying: do not make this answer wait
            self._wake.set()
            return
        delivery = await self._in_writer(self._deliver, row)
        if delivery != "billed" and delivery != "already_billed":
            self._wake.set()

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
        log.info(
            "billed request_id=%s tier=%s input=%d output=%d nanos=%d new=%s",
            row.request_id,
            row.tier,
            row.input_tokens,
            row.output_tokens,
            row.cost_nanos,
            inserted,
        )
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
        cost = request_cost(self.settings, sub.model, sub.tier, input_tokens, 0, output_tokens)
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
