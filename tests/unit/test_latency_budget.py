"""The latency budget (DESIGN.md, "Latency budget"), pinned with a fake clock.

Two levels: `LatencyBudget` alone, fed interactive token times; and the `Scheduler`
driving a synthetic engine whose every step takes tpot = c * (1 + g * (active - 1))
and produces one token for each running job (the simulated backend's model), under a
flex flood that always has work queued. Nothing sleeps or reads a clock.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flexserve.config import InvalidSettings, SchedulerSettings, load_settings
from flexserve.scheduling import JobSpec, Scheduler
from flexserve.scheduling.latency_budget import LatencyBudget


def feed(budget: LatencyBudget, job: str, start: float, tpot: float, n: int, beside: int) -> float:
    """`n` tokens of one interactive job, `tpot` apart, with `beside` flex running."""
    now = start
    for _ in range(n):
        budget.token(job, now, beside)
        now += tpot
    return now


# ---- the controller alone -----------------------------------------------------------------


def test_it_starts_conservative_until_a_baseline_is_measured() -> None:
    budget = LatencyBudget(budget=1.25, max_width=3)
    assert budget.width(0.0) == 0
    feed(budget, "d", 0.0, 0.02, 8, beside=0)  # 7 intervals: not a sample yet
    assert budget.width(0.2) == 0

    budget.token("d", 0.16, 0)  # the 8th interval
    assert budget.slowdown(0) == pytest.approx(1.0)
    assert budget.width(0.16) == 1  # then one step at a time


def test_a_width_over_budget_is_left_at_once_and_tried_again_ever_more_rarely() -> None:
    budget = LatencyBudget(budget=1.25, max_width=3)
    now = feed(budget, "d", 0.0, 0.020, 9, beside=0)
    assert budget.width(now) == 1
    now = feed(budget, "e", now, 0.030, 9, beside=1)  # 1.5 x the baseline

    assert budget.slowdown(1) == pytest.approx(1.5)
    assert budget.width(now) == 0
    failed = now
    for wait in (budget.retry_after, 2 * budget.retry_after, budget.retry_after_max):
        now = feed(budget, "f", failed + wait - 1.0, 0.020, 9, beside=0)
        assert budget.width(now) == 0  # not yet
        now = feed(budget, "g", failed + wait, 0.020, 9, beside=0)
        assert budget.width(now) == 1  # tried again ...
        failed = feed(budget, "h", now, 0.030, 9, beside=1)
        assert budget.width(failed) == 0  # ... and still over


def test_an_interval_that_straddles_a_width_change_is_not_counted() -> None:
    budget = LatencyBudget(budget=1.25, max_width=3, sample_tokens=2)
    budget.token("d", 0.0, 0)
    budget.token("d", 1.0, 2)  # a long interval, but the width changed during it
    budget.token("d", 1.02, 2)
    assert budget.slowdown(2) is None and budget.slowdown(0) is None


def test_tokens_seen_at_one_instant_still_average_right() -> None:
    """The runtime applies the token events it finds waiting with one `now`: intervals
    of 0 and 2 x tpot must average to tpot."""
    budget = LatencyBudget(budget=1.25, max_width=3, sample_tokens=4)
    for now in (0.0, 0.04, 0.04, 0.08, 0.08):
        budget.token("d", now, 0)
    feed(budget, "e", 1.0, 0.02, 5, beside=1)
    assert budget.slowdown(1) == pytest.approx(1.0)


def test_the_baseline_is_measured_again_when_old() -> None:
    budget = LatencyBudget(budget=1.5, max_width=3)
    now = feed(budget, "d", 0.0, 0.020, 9, beside=0)
    now = feed(budget, "e", now, 0.022, 9, beside=1)
    assert budget.width(now) == 2

    old = now + budget.probe_interval + 0.1
    assert budget.probing(old) and budget.width(old) == 0  # narrowed to measure it
    now = feed(budget, "f", old, 0.020, 9, beside=0)
    assert not budget.probing(now) and budget.width(now) == 2  # and back


def test_a_stall_does_not_make_flex_look_cheap() -> None:
    """One baseline sample 7.5 x too slow (the machine was busy): the widths measured
    next are still judged against about the real baseline."""
    budget = LatencyBudget(budget=1.25, max_width=3)
    now = feed(budget, "d", 0.0, 0.020, 9, beside=0)
    now = feed(budget, "e", now, 0.15, 9, beside=0)  # 7.5 x: slow, but not a stall
    assert budget.width(now) == 1
    now = feed(budget, "f", now, 0.040, 9, beside=1)  # twice the real baseline

    assert budget.width(now) == 0


def test_a_stall_between_two_tokens_is_not_time_per_token() -> None:
    budget = LatencyBudget(budget=1.25, max_width=3)
    now = feed(budget, "d", 0.0, 0.020, 9, beside=0)
    now = feed(budget, "e", now, 0.020, 5, beside=0)
    now = feed(budget, "e", now + 1.0, 0.020, 5, beside=0)  # one interval of ~1 s

    assert budget.slowdown(0) == pytest.approx(1.0)
    assert budget._estimates[0].value == pytest.approx(0.020)


def test_an_engine_that_became_much_slower_is_still_learned() -> None:
    """Twenty times slower for good: stalls at first, then probes learn it, each by at
    most 1.5 x (too low a baseline only narrows flex meanwhile)."""
    budget = LatencyBudget(budget=1.25, max_width=3)
    now = feed(budget, "d", 0.0, 0.020, 9, beside=0)
    now = feed(budget, "e", now, 0.4, 750, beside=0)  # 5 minutes

    assert budget._estimates[0].value > 0.3
    assert not budget.probing(now)


def test_it_refuses_a_budget_that_is_no_budget() -> None:
    with pytest.raises(ValueError):
        LatencyBudget(budget=1.0, max_width=2)


@pytest.mark.parametrize("value", [1.0, 0.5, -2.0])
def test_the_setting_must_be_above_one(value: float) -> None:
    with pytest.raises(InvalidSettings, match=r"scheduler\.interactive_slowdown_max"):
        load_settings(scheduler={"interactive_slowdown_max": value})


def test_the_setting_is_off_by_default() -> None:
    assert SchedulerSettings().interactive_slowdown_max is None
    assert Scheduler(SchedulerSettings(), slots=4).latency_budget is None


# ---- the scheduler driving a synthetic engine ---------------------------------------------


@dataclass
class Engine:
    """Steps of c * (1 + g * (active - 1)) seconds, one token per running job each.

    A flex flood keeps `flood` flex jobs queued; interactive answers of `answer` tokens
    arrive one at a time, `gap` seconds after the previous one ended (so the no-flex
    TPOT of an interactive job is exactly c)."""

    sched: Scheduler
    c: float
    g: float
    answer: int = 40
    gap: float = 0.5
    flood: int = 8
    interactive: bool = True
    now: float = 0.0
    count: int = 0
    produced: Counter[str] = field(default_factory=Counter)
    first: dict[str, float] = field(default_factory=dict)
    tpots: list[tuple[float, float]] = field(default_factory=list)  # (end, TPOT)
    widths: list[tuple[float, int]] = field(default_factory=list)  # flex beside, per step
    next_arrival: float = 0.0

    def run(self, until: float) -> None:
        while self.now < until:
            self.top_up_flex()
            if self.interactive and self.now >= self.next_arrival and not self.busy():
                self.arrive("default", max_tokens=self.answer)
                self.next_arrival = math.inf
            self.sched.step(self.now)
            self.one_step()

    def busy(self) -> bool:
        return any(self.is_interactive(j) for j in self.all_jobs())

    def all_jobs(self) -> list[str]:
        return self.sched.running_ids() + self.sched.queued_ids()

    def is_interactive(self, job_id: str) -> bool:
        job = self.sched.job(job_id)
        return job is not None and job.spec.interactive

    def top_up_flex(self) -> None:
        queued = sum(1 for j in self.sched.queued_ids() if not self.is_interactive(j))
        for _ in range(self.flood - queued):
            self.arrive("flex", max_tokens=200)

    def arrive(self, tier: str, max_tokens: int) -> None:
        self.count += 1
        job_id = f"{tier[0]}{self.count}"
        spec = JobSpec(job_id, "t", tier, 10, max_tokens, self.now, self.now + 1e9)  # type: ignore[arg-type]
        self.sched.arrive(spec, self.now)

    def one_step(self) -> None:
        running = self.sched.running_ids()
        beside = sum(1 for j in running if not self.is_interactive(j))
        if running and beside < len(running):
            self.widths.append((self.now, beside))
        self.now += self.c * (1 + self.g * (max(1, len(running)) - 1))
        for job_id in running:
            self.sched.token(job_id, self.now)
            self.produced[job_id] += 1
            self.first.setdefault(job_id, self.now)
            spec = self.sched.job(job_id).spec  # type: ignore[union-attr]
            if self.produced[job_id] == spec.max_tokens:
                self.end(job_id, spec.interactive)

    def end(self, job_id: str, interactive: bool) -> None:
        self.sched.finish(job_id, self.now)
        if interactive:
            tpot = (self.now - self.first[job_id]) / (self.produced[job_id] - 1)
            self.tpots.append((self.now, tpot))
            self.next_arrival = self.now + self.gap

    def slowdowns(self, since: float) -> list[float]:
        return [tpot / self.c for end, tpot in self.tpots if end >= since]

    def usual_width(self, since: float) -> int:
        return Counter(w for t, w in self.widths if t >= since).most_common(1)[0][0]


def engine(budget: float | None, c: float, g: float, slots: int = 6, **kw: object) -> Engine:
    config = SchedulerSettings(interactive_slowdown_max=budget, flex_max_wait=1e9)
    return Engine(Scheduler(config, slots=slots), c=c, g=g, **kw)  # type: ignore[arg-type]


def best_width(budget: float, g: float, widest: int) -> int:
    """The widest flex width whose slowdown 1 + g * w is within the budget."""
    return widest if g == 0 else min(widest, math.floor((budget - 1) / g + 1e-9))


def test_without_a_budget_flex_fills_every_slot_beside_interactive_work() -> None:
    run = engine(None, c=0.02, g=0.2)
    run.run(30.0)
    assert run.usual_width(10.0) == 5
    assert min(run.slowdowns(10.0)) == pytest.approx(2.0)  # 1 + 0.2 * 5


@pytest.mark.parametrize(("budget", "expected"), [(1.1, 0), (1.25, 1), (1.5, 2), (2.5, 5)])
def test_it_settles_on_the_widest_width_within_budget(budget: float, expected: int) -> None:
    run = engine(budget, c=0.02, g=0.2)
    run.run(120.0)
    assert run.usual_width(30.0) == expected == best_width(budget, 0.2, 5)
    slowdowns = run.slowdowns(30.0)
    assert sorted(slowdowns)[len(slowdowns) // 2] <= budget
    assert max(slowdowns) <= budget * 1.1  # trials of the next width included


def test_it_grows_back_when_the_engine_slows_less() -> None:
    run = engine(1.25, c=0.02, g=0.2)
    run.run(60.0)
    assert run.usual_width(30.0) == 1
    run.g = 0.04  # e.g. another process left the machine
    run.run(180.0)
    assert run.usual_width(150.0) == 5
    assert max(run.slowdowns(150.0)) <= 1.25


def test_it_narrows_when_the_engine_slows_more() -> None:
    run = engine(1.25, c=0.02, g=0.04)
    run.run(60.0)
    assert run.usual_width(30.0) == 5
    run.g = 0.2
    run.run(120.0)
    assert run.usual_width(90.0) == 1
    assert max(run.slowdowns(90.0)) <= 1.25 * 1.1


def test_a_drifting_baseline_is_learned_again() -> None:
    """Everything twice as slow (longer contexts, say): the slowdown is the same, so the
    width must not collapse as it would against the old baseline."""
    run = engine(1.5, c=0.02, g=0.2)
    run.run(60.0)
    assert run.usual_width(30.0) == 2
    run.c = 0.04
    run.run(150.0)
    assert run.usual_width(90.0) == 2
    assert max(tpot / 0.04 for end, tpot in run.tpots if end >= 90.0) <= 1.5 * 1.1


def test_a_baseline_that_drifts_down_is_learned_again() -> None:
    """Everything twice as fast: against the old baseline every width would look within
    budget, and only measuring the baseline again keeps the width where it belongs."""
    run = engine(1.5, c=0.04, g=0.2)
    run.run(60.0)
    assert run.usual_width(30.0) == 2
    run.c = 0.02
    run.run(150.0)
    assert run.usual_width(90.0) == 2
    assert max(run.slowdowns(90.0)) <= 1.5 * 1.1


def test_flex_takes_every_slot_when_no_interactive_job_runs() -> None:
    run = engine(1.1, c=0.02, g=0.5, gap=5.0)  # interactive narrows flex to 0 ...
    run.run(60.0)
    assert run.usual_width(30.0) == 0
    run.interactive = False  # ... and leaves
    run.run(70.0)
    assert len(run.sched.running_ids()) == 6
    assert all(not run.is_interactive(j) for j in run.sched.running_ids())


@settings(max_examples=25, deadline=None)
@given(
    budget=st.sampled_from([1.05, 1.1, 1.25, 1.5, 2.0]),
    c=st.sampled_from([0.005, 0.02, 0.06]),
    g=st.floats(0.0, 1.0).map(lambda g: round(g, 3)),
    slots=st.integers(2, 6),
)
def test_it_converges_within_budget_for_any_engine(
    budget: float, c: float, g: float, slots: int
) -> None:
    """Whatever the engine's slowdown per sequence: the usual width is the widest within
    budget, and interactive time per token, all answers pooled, is within it too."""
    assume(g == 0 or abs((budget - 1) / g - round((budget - 1) / g)) > 1e-6)  # no tie
    run = engine(budget, c=c, g=g, slots=slots)
    run.run(3000 * c)
    since = 1000 * c
    assert run.usual_width(since) == best_width(budget, g, slots - 1)
    pooled = sum(t for end, t in run.tpots if end >= since) / len(run.slowdowns(since))
    assert pooled / c <= budget * 1.02
