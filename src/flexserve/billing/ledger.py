"""Turns a settled job into at most one ledger row, written off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time

from flexserve.billing.prices import request_cost
from flexserve.config import Settings
from flexserve.runtime import JobHandle, Outcome
from flexserve.store import LedgerRow, Store

log = logging.getLogger("flexserve.billing")

WRITE_ATTEMPTS = 4
RETRY_DELAY = 0.05
BILLED: frozenset[Outcome] = frozenset({"completed", "cancelled"})
"""Shed, overloaded and failed requests cost nothing."""


class Ledger:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def settle(self, handle: JobHandle, outcome: Outcome) -> None:
        if outcome not in BILLED:
            return
        try:
            row = self.row(handle, outcome)
        except Exception:  # a bad price table must not fail a finished request
            log.exception("cannot price request_id=%s", handle.request_id)
            return
        inserted = await self._record(row)
        if inserted is None:
            return
        log.info(
            "billed request_id=%s tier=%s input=%d output=%d nanos=%d new=%s",
            row.request_id,
            row.tier,
            row.input_tokens,
            row.output_tokens,
            row.cost_nanos,
            inserted,
        )

    async def _record(self, row: LedgerRow) -> bool | None:
        """Write the row, retrying: the answer is already out, so the write must not fail
        the request. Retries are safe because the request id makes the write idempotent."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return await asyncio.to_thread(self.store.record, row)
            except Exception:
                log.warning(
                    "ledger write failed request_id=%s attempt=%d", row.request_id, attempt + 1
                )
                await asyncio.sleep(RETRY_DELAY * 2**attempt)
        log.error("ledger write gave up request_id=%s tier=%s", row.request_id, row.tier)
        return None

    def row(self, handle: JobHandle, outcome: Outcome) -> LedgerRow:
        """Input once, each produced token once, however often the job was preempted."""
        sub = handle.submission
        input_tokens = len(sub.prompt_tokens)
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
