"""What the handlers share: one per app, built by the app factory."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from flexserve.api.key_cache import KeyCache
from flexserve.api.limits import RateLimiter
from flexserve.api.retries import Orphans
from flexserve.billing import Ledger
from flexserve.config import Settings
from flexserve.metrics import Metrics
from flexserve.runtime import Fleet, JobHandle, Outcome
from flexserve.store import Store


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

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.store, self.settings)
        self.limits = RateLimiter(self.settings, self.fleet.clock)

    async def start(self) -> None:
        await self.ledger.start()

    async def close(self) -> None:
        """After the runtime closed: its last settles are in the ledger's outbox."""
        await self.ledger.close()
        self.keys.close()

    async def settle(self, handle: JobHandle, outcome: Outcome) -> None:
        """Called once per job by the runtime: count it, and bill it if billable."""
        tier = handle.submission.tier
        self.metrics.requests.labels(tier, outcome).inc()
        if handle.preemptions:
            self.metrics.preemptions.labels(tier).inc(handle.preemptions)
        self.limits.settled(handle.request_id, len(handle.produced))
        await self.ledger.settle(handle, outcome)
        if outcome in ("completed", "cancelled"):
            self.metrics.tokens.labels(tier, "input").inc(handle.prompt_token_count)
            self.metrics.tokens.labels(tier, "output").inc(len(handle.produced))


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.flexserve
    return state
