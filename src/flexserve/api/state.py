"""What the handlers share: one per app, built by the app factory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from flexserve.api.background import BackgroundResponses
from flexserve.api.key_cache import KeyCache
from flexserve.api.limits import RateLimiter
from flexserve.api.retries import Orphans
from flexserve.billing import Ledger
from flexserve.config import Settings
from flexserve.metrics import Metrics
from flexserve.runtime import Fleet, JobHandle, Outcome, settled_now
from flexserve.store import Store
from flexserve.store.responses_sql import ResponseStore

if TYPE_CHECKING:
    from flexserve.batch.runner import BatchRunner
    from flexserve.batch.service import BatchService


@dataclass
class AppState:
    settings: Settings
    fleet: Fleet
    """Every served model with its backend and runtime."""
    store: Store
    ledger: Ledger
    metrics: Metrics
    keys: KeyCache = field(init=False)
    limits: RateLimiter = field(init=False)
    orphans: Orphans = field(default_factory=Orphans)
    """Answers whose client left, kept for its retry (api/retries.py)."""
    batches: BatchService | None = None
    """Files and batches (None when the store is not SQL)."""
    runner: BatchRunner | None = None
    """This replica's batch runner."""
    responses: ResponseStore | None = None
    """Stored responses (None when the store is not SQL)."""
    background: BackgroundResponses = field(init=False)
    """Background responses running here."""

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.store, self.settings)
        self.limits = RateLimiter(self.settings, self.fleet.clock, self._rate_limited)
        self.background = BackgroundResponses(None, self.fleet, self.settings)

    def _rate_limited(self, tier: str) -> None:
        self.metrics.requests_for(tier, "rate_limited").inc()

    async def start(self) -> None:
        await self.ledger.start()
        if self.runner is not None:
            await self.runner.start()
        await self.background.resume_unfinished()

    async def stop_runner(self) -> None:
        """Before the runtimes close: no batch line is claimed or settled after this, and
        background responses stay unfinished in the store (the next start resumes them)."""
        await self.background.close()
        if self.runner is not None:
            await self.runner.close()

    async def close(self) -> None:
        """After the runtime closed: its last settles are in the store or the ledger's outbox."""
        await self.ledger.close()
        self.keys.close()

    def settle(self, handle: JobHandle, outcome: Outcome) -> asyncio.Future[None]:
        """Called once per job by the runtime: count it now, and bill it if billable; the
        future is done when its bill is committed (what the answer's last byte waits for)."""
        tier = handle.submission.tier
        if handle.submission.billed_by_caller and outcome == "shed":
            # a batch line with no room yet: it waits in its batch, no one was refused
            return settled_now()
        self.metrics.requests_for(tier, outcome).inc()
        if handle.preemptions:
            self.metrics.preemptions_for(tier).inc(handle.preemptions)
        self.limits.settled(handle.request_id, len(handle.produced))
        if outcome in ("completed", "cancelled"):
            self.metrics.tokens_for(tier, "input").inc(handle.prompt_token_count)
            self.metrics.tokens_for(tier, "output").inc(len(handle.produced))
        if handle.submission.billed_by_caller:
            return settled_now()  # the batch runner writes the row with the line's result
        return self.ledger.bill(handle, outcome)


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.flexserve
    return state
