"""A circuit breaker per upstream backend, with an injected clock (pure; no I/O).

closed: requests flow; `failure_threshold` failures in a row open it.
open: no request is sent until `cooldown` has passed; then one probe may go (half-open).
half-open: the probe's success closes the breaker, its failure opens it again with the
cooldown doubled (up to `max_cooldown`), so a dead engine is not hammered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown: float = 2.0
    max_cooldown: float = 60.0
    state: BreakerState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    _current_cooldown: float = 0.0
    _probe_out: bool = False

    def allows(self, now: float) -> bool:
        """May a request be sent now? In half-open state, only one (the probe)."""
        if self.state == "open" and now - self.opened_at >= self._current_cooldown:
            self.state = "half_open"
            self._probe_out = False
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def healthy(self, now: float) -> bool:
        """For routing and /healthz: closed, or ready for a probe (open long enough, or
        half-open with its probe not taken: a pool routes by this, so it must say yes
        there, or the backend would never get its probe)."""
        if self.state == "half_open":
            return not self._probe_out
        return self.state == "closed" or (
            self.state == "open" and now - self.opened_at >= self._current_cooldown
        )

    def remaining(self, now: float) -> float:
        """Seconds until a probe may go (0 when requests flow)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self._current_cooldown - now)

    def release_probe(self) -> None:
        """The probe ended with no verdict (it was paused or its client left): another
        request may probe, or the breaker would stay half-open for ever."""
        if self.state == "half_open":
            self._probe_out = False

    def succeeded(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._current_cooldown = 0.0
        self._probe_out = False

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open":
            self._open(now, min(self.max_cooldown, max(self.cooldown, 2 * self._current_cooldown)))
        elif self.state == "closed" and self.failures >= self.failure_threshold:
            self._open(now, self.cooldown)

    def trip(self, now: float) -> None:
        """Out at once (the engine did not answer at start: refused, reset or timed
        out): probed after the cooldown like any open breaker."""
        self.failures = max(self.failures, self.failure_threshold)
        self._open(now, self.cooldown)

    def _open(self, now: float, cooldown: float) -> None:
        self.state = "open"
        self.opened_at = now
        self._current_cooldown = cooldown
        self._probe_out = False
