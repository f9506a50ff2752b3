"""What the handlers share: one per app, built by the app factory."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from flexserve.api.retries import Orphans
from flexserve.backends.base import Backend
from flexserve.billing import Ledger
from flexserve.config import Settings
from flexserve.metrics import Metrics
from flexserve.runtime import JobHandle, Outcome, Runtime
from flexserve.store import KeyRecord, Store


@dataclass
class AppState:
    settings: Settings
    backend: Backend
    store: Store
    runtime: Runtime
    ledger: Ledger
    metrics: Metrics
    key_cache: dict[str, tuple[KeyRecord, float]] = field(default_factory=dict)
    """Key hash -> (record, when cached); entries live `key_cache_seconds`."""
    orphans: Orphans = field(default_factory=Orphans)
    """Answers whose client left, kept for its retry (api/retries.py)."""
    key_generation: int = 0
    """Bumped on every revoke: a lookup that began before it is not cached."""

    def forget_keys(self) -> None:
        self.key_cache.clear()
        self.key_generation += 1

    async def settle(self, handle: JobHandle, outcome: Outcome) -> None:
        """Called once per job by the runtime: count it, and bill it if billable."""
        tier = handle.submission.tier
        self.metrics.requests.labels(tier, outcome).inc()
        if handle.preemptions:
            self.metrics.preemptions.labels(tier).inc(handle.preemptions)
        await self.ledger.settle(handle, outcome)
        if outcome in ("completed", "cancelled"):
            self.metrics.tokens.labels(tier, "input").inc(len(handle.submission.prompt_tokens))
            self.metrics.tokens.labels(tier, "output").inc(len(handle.produced))


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.flexserve
    return state
