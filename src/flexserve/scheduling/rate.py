"""The measured service rate that predictions divide by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServiceRate:
    """Output tokens per busy slot-second, exponentially weighted over fixed windows.

    Also tracks which share of the slot-time interactive jobs took, so a prediction for
    flex counts only the capacity interactive traffic has been leaving over.
    """

    per_slot: float
    window: float
    smoothing: float
    interactive_share: float = 0.0
    _window_start: float = 0.0
    _tokens: int = 0
    _busy: float = 0.0
    _interactive_busy: float = 0.0
    _slot_capacity: float = 0.0

    def observe_busy(self, slots: int, running: int, interactive: int, elapsed: float) -> None:
        self._busy += running * elapsed
        self._interactive_busy += interactive * elapsed
        self._slot_capacity += slots * elapsed

    def observe_tokens(self, count: int) -> None:
        self._tokens += count

    def roll(self, now: float) -> None:
        """Close the window when it is over; idle windows carry no information.

        Compared exactly as `next_roll()` computes it: `now - start < window` can differ
        from `now < start + window` in floating point, and then a step at `next_roll()`
        would never close the window and time would stop at that wakeup."""
        if now < self.next_roll():
            return
        if self._busy > 0.05 * self.window and self._tokens > 0:
            sample = self._tokens / self._busy
            self.per_slot += self.smoothing * (sample - self.per_slot)
        if self._slot_capacity > 0:
            share = self._interactive_busy / self._slot_capacity
            self.interactive_share += self.smoothing * (share - self.interactive_share)
        self._window_start = now
        self._tokens = 0
        self._busy = self._interactive_busy = self._slot_capacity = 0.0

    def next_roll(self) -> float:
        return self._window_start + self.window
