"""The latency budget: how many flex/batch sequences may run beside interactive ones.

Every engine slows each of its sequences as its batch grows (a CPU a lot, a GPU a
little), and flexserve cannot see inside an upstream engine, so it measures instead of
guessing. Each interactive job's output tokens arrive as events with their time; the
interval between two consecutive tokens of one job is a sample of interactive time per
output token (TPOT), labelled with how many flex/batch sequences ran beside it ("width").
From these the controller keeps, exponentially weighted:

- the *baseline*: interactive TPOT with no flex beside (width 0);
- per width w >= 1: interactive TPOT with w beside; its slowdown is that ÷ the baseline;

and walks an allowed width up and down so that slowdown(width) <= the budget
(`interactive_slowdown_max`):

- up by one after a fresh sample at the current width that is within budget, unless the
  next width was found over budget: that one is tried again (one sample) only after
  `retry_after`, doubled after each failed trial up to `retry_after_max`, so a width over
  budget costs ever rarer short trials, and a width that became affordable (a quieter
  machine) is still found again;
- down below any width whose estimate is over budget, at once;
- a *probe* re-learns the baseline, which drifts (other load on the machine, longer
  contexts): when it is older than `probe_interval`, the width is 0 until one fresh
  baseline sample has come in; the controller then resumes at the width it had.

It starts at width 0 (conservative): the first interactive tokens measure the baseline,
and the width grows from there one sample at a time. Only jobs with at least two output
tokens teach it anything. With no interactive job running the scheduler does not ask it:
flex then takes every slot.

Samples are sums over `sample_tokens` intervals rather than single intervals: the
runtime applies the token events it finds waiting with one `now`, so single intervals
can be 0 followed by a double one, and a sum telescopes that away. An interval counts
only if the width was the same at both of its tokens, since one that straddles a change
measured neither width. Pure policy: no clock reads, every time comes with its event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SAMPLE_TOKENS = 8
"""Token intervals folded into one sample (about a quarter of a short answer)."""
SMOOTHING = 0.3
"""Least weight of the newest sample in an estimate (more when the estimate is old)."""
PROBE_INTERVAL = 15.0
"""Seconds a baseline is trusted before flex is narrowed to 0 to measure it again."""
STALL_FACTOR = 10.0
"""An interval longer than this many baselines is a stall (the machine's other load, a
collection), not time per token: it is not counted, unless the baseline is due to be
measured again (else an engine that became ten times slower would never be learned)."""
BASELINE_MAX_RISE = 1.5
"""Most a baseline sample may count above the baseline (it is clipped there): a stall
(the machine's other load, a collection) must not make flex look cheap, while a
baseline that rises for real still gets there in a few samples, and every width
measured meanwhile looks slower, which narrows flex: the safe side."""
RETRY_AFTER = 30.0
"""Seconds after which a width found over budget is first tried again."""
RETRY_AFTER_MAX = 120.0
"""Longest wait before trying again a width found over budget time after time."""
STALE_AFTER = 30.0
"""Seconds after which intervals collected toward a sample are dropped as too old."""


@dataclass
class _Estimate:
    value: float
    at: float  # time of the newest sample


@dataclass
class _Pending:
    """Intervals collected toward the next sample of one width."""

    total: float = 0.0
    count: int = 0
    since: float = 0.0


@dataclass
class LatencyBudget:
    """Allowed flex/batch width beside interactive work, learned from interactive TPOT."""

    budget: float
    """Most interactive TPOT with flex beside ÷ TPOT without (> 1)."""
    max_width: int
    """The widest it ever allows (slots, reserve and `flex_width_when_busy` applied)."""
    sample_tokens: int = SAMPLE_TOKENS
    smoothing: float = SMOOTHING
    probe_interval: float = PROBE_INTERVAL
    retry_after: float = RETRY_AFTER
    retry_after_max: float = RETRY_AFTER_MAX
    stale_after: float = STALE_AFTER
    baseline_max_rise: float = BASELINE_MAX_RISE
    stall_factor: float = STALL_FACTOR
    _width: int = 0
    _estimates: dict[int, _Estimate] = field(default_factory=dict)
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _last_token: dict[str, tuple[float, int]] = field(default_factory=dict)
    _blocked_until: dict[int, float] = field(default_factory=dict)
    _backoff: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget <= 1.0:
            raise ValueError("a slowdown budget must be above 1.0")
        if self.max_width < 0 or self.sample_tokens < 1:
            raise ValueError("max_width must be >= 0 and sample_tokens >= 1")

    # ---- events ---------------------------------------------------------------------

    def token(self, job_id: str, now: float, beside: int, count: int = 1) -> None:
        """An interactive job produced `count` output tokens while `beside` flex/batch
        sequences were running."""
        previous = self._last_token.get(job_id)
        self._last_token[job_id] = (now, beside)
        if previous is None or previous[1] != beside:
            return  # its first token (that is TTFT, not TPOT), or the width changed
        if self._stall(now - previous[0], count, now):
            return
        pending = self._pending.setdefault(beside, _Pending(since=previous[0]))
        if now - pending.since > self.stale_after:  # old intervals say little about now
            pending.total, pending.count, pending.since = 0.0, 0, previous[0]
        pending.total += now - previous[0]
        pending.count += count
        if pending.count >= self.sample_tokens:
            del self._pending[beside]
            self._learn(beside, pending.total / pending.count, now)

    def _stall(self, interval: float, count: int, now: float) -> bool:
        baseline = self._estimates.get(0)
        if baseline is None or self.probing(now):
            return False
        return interval > self.stall_factor * baseline.value * count

    def forget(self, job_id: str) -> None:
        """The job no longer runs (finished, cancelled, requeued)."""
        self._last_token.pop(job_id, None)

    # ---- the decision ---------------------------------------------------------------

    def width(self, now: float) -> int:
        """Most flex/batch sequences allowed beside interactive work at `now`."""
        return 0 if self.probing(now) else self._width

    def probing(self, now: float) -> bool:
        """True while the baseline is missing or too old: flex is narrowed to 0."""
        baseline = self._estimates.get(0)
        return baseline is None or now - baseline.at > self.probe_interval

    def slowdown(self, width: int) -> float | None:
        """Measured TPOT at `width` ÷ the baseline (None until both are measured)."""
        baseline = self._estimates.get(0)
        estimate = self._estimates.get(width)
        if baseline is None or estimate is None or baseline.value <= 0.0:
            return None
        return estimate.value / baseline.value

    def _learn(self, width: int, sample: float, now: float) -> None:
        """Blend `sample` in, weighted by how old the estimate is: its memory is a time
        (`probe_interval`), not a count of samples, so a baseline that only probes
        refresh follows a drift within a probe or two, and a width sampled every few
        tokens is smoothed over many samples."""
        estimate = self._estimates.get(width)
        if estimate is None:
            self._estimates[width] = _Estimate(sample, now)
        else:
            if width == 0:
                sample = min(sample, estimate.value * self.baseline_max_rise)
            age = max(0.0, now - estimate.at)
            weight = max(self.smoothing, 1.0 - math.exp(-age / self.probe_interval))
            estimate.value += weight * (sample - estimate.value)
            estimate.at = now
        self._adjust(width, now)

    def _adjust(self, width: int, now: float) -> None:
        """After a sample at `width`: down below it if it is over budget (and that width
        blocked for a while); up by one if it is the current width, within budget, and
        the next width is not blocked."""
        if width > 0 and self._over(width):
            self._width = min(self._width, width - 1)
            backoff = self._backoff.get(width, self.retry_after)
            self._blocked_until[width] = now + backoff
            self._backoff[width] = min(2 * backoff, self.retry_after_max)
            return
        self._backoff.pop(width, None)
        if width != self._width or self._width >= self.max_width:
            return
        if now >= self._blocked_until.get(width + 1, -math.inf):
            self._width += 1

    def _over(self, width: int) -> bool:
        slowdown = self.slowdown(width)
        return slowdown is not None and slowdown > self.budget
