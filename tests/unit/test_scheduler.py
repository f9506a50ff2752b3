"""The scheduling policy (DESIGN.md, "Scheduling policy"), pinned with a fake clock.

Time is a plain float passed as `now`; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from typing import Any

import pytest

from flexserve.config import SchedulerSettings
from flexserve.scheduling import Admitted, JobSpec, Phase, Plan, Rejected, Scheduler, Tier


def settings(**overrides: Any) -> SchedulerSettings:
    return SchedulerSettings(**overrides)


def make_spec(
    job_id: str,
    tier: Tier = "flex",
    *,
    now: float = 0.0,
    tenant: str = "t",
    prompt: int = 10,
    max_tokens: int = 20,
    max_wait: float | None = None,
    config: SchedulerSettings | None = None,
) -> JobSpec:
    config = config or SchedulerSettings()
    if max_wait is None:
        interactive = tier in ("priority", "default")
        max_wait = config.interactive_max_wait if interactive else config.flex_max_wait
    return JobSpec(job_id, tenant, tier, prompt, max_tokens, now, now + max_wait)


def admit(sched: Scheduler, spec: JobSpec) -> None:
    admission = sched.arrive(spec, spec.arrival)
    assert isinstance(admission, Admitted), admission


def run_until(sched: Scheduler, end: float, now: float) -> list[tuple[float, Plan]]:
    """Step at every wakeup up to `end` (inclusive), as the runtime's loop does."""
    plans = [(now, sched.step(now))]
    for _ in range(100_000):
        wakeup = sched.next_wakeup()
        if wakeup > end:
            return plans
        now = max(now, wakeup)
        plans.append((now, sched.step(now)))
    raise AssertionError("next_wakeup() did not move forward")


def started_ids(plans: list[tuple[float, Plan]]) -> list[str]:
    return [job_id for _, plan in plans for job_id in plan.start]


def shed_at(plans: list[tuple[float, Plan]]) -> dict[str, float]:
    return {r.job_id: t for t, plan in plans for r in plan.shed}


def overloaded_at(plans: list[tuple[float, Plan]]) -> dict[str, float]:
    return {r.job_id: t for t, plan in plans for r in plan.overloaded}


def start_order(sched: Scheduler, count: int, now: float) -> list[str]:
    """Finish the running job `count` times, a second apart; who starts each time."""
    order: list[str] = []
    for _ in range(count):
        sched.finish(sched.running_ids()[0], now)
        order.extend(sched.step(now).start)
        now += 1.0
    return order


def fill_with_flex(sched: Scheduler, count: int, now: float = 0.0, **kw: Any) -> list[str]:
    """Flex arrivals, one step after each (as the runtime's loop would)."""
    ids = [f"f{i}" for i in range(count)]
    for job_id in ids:
        admit(sched, make_spec(job_id, "flex", now=now, **kw))
        sched.step(now)
    return ids


# ---- 1. interactive first ---------------------------------------------------------------


def test_interactive_starts_on_a_free_slot() -> None:
    sched = Scheduler(settings(), slots=2, now=0.0)
    admit(sched, make_spec("d", "default"))

    plan = sched.step(0.0)

    assert plan == Plan(start=("d",))
    assert sched.running_ids() == ["d"]


def test_default_arrival_preempts_exactly_one_flex_job_and_starts_in_the_same_step() -> None:
    sched = Scheduler(settings(), slots=2, now=0.0)
    admit(sched, make_spec("f_early", max_wait=100))
    admit(sched, make_spec("f_late", max_wait=200))
    assert sched.step(0.0).start == ("f_early", "f_late")

    admit(sched, make_spec("d", "default", now=1.0))
    plan = sched.step(1.0)

    assert plan.preempt == ("f_late",)  # the latest deadline loses least
    assert plan.start == ("d",)
    assert sorted(sched.running_ids()) == ["d", "f_early"]
    assert sched.queued_ids() == ["f_late"]


def test_victim_is_batch_before_flex_whatever_the_deadlines() -> None:
    sched = Scheduler(settings(), slots=2, now=0.0)
    admit(sched, make_spec("b", "batch", max_wait=10))
    admit(sched, make_spec("f", "flex", max_wait=500))
    sched.step(0.0)
    assert sorted(sched.running_ids()) == ["b", "f"]

    admit(sched, make_spec("d", "default", now=1.0))

    assert sched.step(1.0).preempt == ("b",)


def test_victim_among_equal_deadlines_has_produced_the_fewest_tokens() -> None:
    sched = Scheduler(settings(), slots=3, now=0.0)
    for job_id in ("f_a", "f_b", "f_c"):
        admit(sched, make_spec(job_id, max_wait=100))
    sched.step(0.0)
    sched.token("f_a", 0.5, count=5)
    sched.token("f_b", 0.5, count=2)
    sched.token("f_c", 0.5, count=9)

    admit(sched, make_spec("p", "priority", now=1.0))

    assert sched.step(1.0).preempt == ("f_b",)


def test_preempted_job_keeps_its_tokens_and_resumes_when_a_slot_frees() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("f", max_tokens=50))
    sched.step(0.0)
    sched.token("f", 0.5, count=7)
    admit(sched, make_spec("d", "default", now=1.0))
    assert sched.step(1.0) == Plan(start=("d",), preempt=("f",))

    paused = sched.job("f")
    assert paused is not None
    assert paused.produced == 7
    assert paused.preemptions == 1
    assert sched.step(2.0).start == ()  # still paused while `d` holds the slot

    sched.finish("d", 3.0)
    assert sched.step(3.0).start == ("f",)
    resumed = sched.job("f")
    assert resumed is not None
    assert resumed.produced == 7
    assert resumed.remaining_output() == 43


def test_preempted_job_is_never_shed_even_past_its_deadline() -> None:
    config = settings(flex_max_wait=10.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f", config=config))
    sched.step(0.0)
    admit(sched, make_spec("d", "default", now=1.0, config=config))
    assert sched.step(1.0).preempt == ("f",)

    plans = run_until(sched, 100.0, 1.0)

    assert shed_at(plans) == {}
    assert sched.queued_ids() == ["f"]
    sched.finish("d", 100.0)
    assert sched.step(100.0).start == ("f",)


def test_interactive_queues_only_when_every_slot_holds_interactive_work() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("d0", "default"))
    sched.step(0.0)
    admit(sched, make_spec("d1", "default", now=1.0))
    admit(sched, make_spec("p1", "priority", now=2.0))
    admit(sched, make_spec("d2", "default", now=3.0))
    admit(sched, make_spec("p2", "priority", now=4.0))

    assert sched.step(4.0) == Plan()
    assert sorted(sched.queued_ids()) == ["d1", "d2", "p1", "p2"]

    order = start_order(sched, 4, now=5.0)
    assert order == ["p1", "p2", "d1", "d2"]  # priority before default, then arrival


def test_queued_interactive_job_is_overloaded_at_arrival_plus_max_wait() -> None:
    config = settings(interactive_max_wait=30.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("d0", "default", config=config))
    sched.step(0.0)
    admit(sched, make_spec("d1", "default", now=1.5, config=config))

    plans = run_until(sched, 100.0, 1.5)

    assert overloaded_at(plans) == {"d1": 31.5}
    refusal = next(r for _, p in plans for r in p.overloaded)
    assert refusal.retry_after >= 1.0
    assert sched.queued_ids() == []
    assert sched.job("d1") is None


def test_interactive_job_that_starts_in_time_is_not_overloaded() -> None:
    config = settings(interactive_max_wait=30.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("d0", "default", config=config))
    sched.step(0.0)
    admit(sched, make_spec("d1", "default", now=1.0, config=config))
    sched.finish("d0", 20.0)
    assert sched.step(20.0).start == ("d1",)

    assert overloaded_at(run_until(sched, 100.0, 20.0)) == {}


# ---- 2. flex fills every idle slot ------------------------------------------------------


def test_flex_fills_every_idle_slot() -> None:
    sched = Scheduler(settings(), slots=4, now=0.0)
    fill_with_flex(sched, 10)

    assert len(sched.running_ids()) == 4
    assert len(sched.queued_ids()) == 6


def test_interactive_reserve_keeps_slots_free_of_flex() -> None:
    sched = Scheduler(settings(interactive_reserve=1), slots=4, now=0.0)
    fill_with_flex(sched, 10)
    assert len(sched.running_ids()) == 3

    admit(sched, make_spec("d", "default", now=1.0))
    plan = sched.step(1.0)

    assert plan == Plan(start=("d",))  # the reserved slot: nothing preempted


def test_flex_width_when_busy_narrows_flex_beside_interactive_work() -> None:
    sched = Scheduler(settings(flex_width_when_busy=1), slots=4, now=0.0)
    fill_with_flex(sched, 10)
    assert len(sched.running_ids()) == 4  # no interactive work: full width

    admit(sched, make_spec("d", "default", now=1.0))
    plan = sched.step(1.0)

    assert plan.start == ("d",)
    assert len(plan.preempt) == 3
    flex_running = [j for j in sched.running_ids() if j != "d"]
    assert len(flex_running) == 1
    assert sched.step(2.0) == Plan()  # stays narrow

    sched.finish("d", 3.0)
    assert len(sched.step(3.0).start) == 3  # back to full width
    assert len(sched.running_ids()) == 4


# ---- 3. honest admission ----------------------------------------------------------------


def test_flex_that_cannot_start_by_its_deadline_is_rejected_with_retry_after() -> None:
    config = settings(cold_start_tokens_per_slot_second=10.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f0", max_tokens=200, config=config))  # ~20 s at 10 tok/s
    sched.step(0.0)

    admission = sched.arrive(make_spec("f1", max_wait=5.0), 0.0)

    assert isinstance(admission, Rejected)
    assert admission.retry_after >= 1.0
    assert admission.retry_after == pytest.approx(20.0 - 5.0)
    assert sched.job("f1") is None
    assert sched.step(0.0) == Plan()


def test_flex_that_can_start_by_its_deadline_is_admitted_with_its_predicted_wait() -> None:
    config = settings(cold_start_tokens_per_slot_second=10.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f0", max_tokens=200, config=config))
    sched.step(0.0)

    admission = sched.arrive(make_spec("f1", max_wait=60.0), 0.0)

    assert isinstance(admission, Admitted)
    assert admission.predicted_wait == pytest.approx(20.0)


def test_admission_uses_the_measured_rate_not_only_the_cold_one() -> None:
    config = settings(cold_start_tokens_per_slot_second=100.0, rate_window=1.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f0", max_tokens=1000, config=config))
    sched.step(0.0)
    probe = make_spec("probe", max_wait=60.0, config=config)
    assert isinstance(sched.arrive(probe, 0.0), Admitted)  # 1000 tok at 100 tok/s: 10 s
    sched.cancel("probe", 0.0)

    now = 0.0
    for _ in range(40):  # the backend turns out to deliver only 2 tok/s
        now += 1.0
        sched.token("f0", now, count=2)
        sched.step(now)
    assert sched.snapshot().tokens_per_slot_second < 10.0

    admission = sched.arrive(make_spec("late", max_wait=60.0, now=now), now)

    assert isinstance(admission, Rejected)
    assert admission.retry_after >= 1.0


def test_flex_queue_job_bound_rejects() -> None:
    config = settings(flex_queue_max_jobs=2)
    sched = Scheduler(config, slots=1, now=0.0)
    fill_with_flex(sched, 3)  # one running, two queued

    admission = sched.arrive(make_spec("f3"), 0.0)

    assert isinstance(admission, Rejected)
    assert admission.retry_after >= 1.0
    assert "full" in admission.reason


def test_flex_queue_token_bound_rejects() -> None:
    config = settings(flex_queue_max_tokens=100)
    sched = Scheduler(config, slots=1, now=0.0)
    fill_with_flex(sched, 2, prompt=10, max_tokens=40)  # one running, 50 tokens queued
    admit(sched, make_spec("fits", prompt=10, max_tokens=40))  # 100 queued

    admission = sched.arrive(make_spec("over", prompt=1, max_tokens=1), 0.0)

    assert isinstance(admission, Rejected)
    assert "token" in admission.reason


def test_admitted_job_never_started_is_shed_at_exactly_its_deadline() -> None:
    config = settings(flex_max_wait=540.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("d", "default", max_tokens=100, config=config))
    sched.step(0.0)
    admit(sched, make_spec("f", now=2.25, config=config))

    plans = run_until(sched, 1000.0, 2.25)

    assert shed_at(plans) == {"f": 542.25}
    refusal = next(r for _, p in plans for r in p.shed)
    assert refusal.retry_after >= 1.0
    assert sched.job("f") is None
    assert started_ids(plans) == []


def test_job_that_starts_exactly_at_its_deadline_is_not_shed() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("d", "default", max_tokens=10))
    sched.step(0.0)
    admit(sched, make_spec("f", max_wait=5.0))
    sched.finish("d", 5.0)

    plan = sched.step(5.0)

    assert plan == Plan(start=("f",))


def test_flex_blocked_by_the_reserve_predicts_the_wait_for_a_flex_slot() -> None:
    config = settings(interactive_reserve=1, cold_start_tokens_per_slot_second=10.0)
    sched = Scheduler(config, slots=2, now=0.0)
    admit(sched, make_spec("f0", max_tokens=200, config=config))  # ~20 s
    sched.step(0.0)

    admission = sched.arrive(make_spec("f1", max_wait=5.0, config=config), 0.0)

    assert isinstance(admission, Rejected)  # a free slot, but not one flex may use


def test_flex_blocked_by_the_busy_width_predicts_the_wait_for_a_flex_slot() -> None:
    config = settings(flex_width_when_busy=1, cold_start_tokens_per_slot_second=10.0)
    sched = Scheduler(config, slots=3, now=0.0)
    admit(sched, make_spec("d", "default", max_tokens=200, config=config))
    admit(sched, make_spec("f0", max_tokens=200, config=config))
    sched.step(0.0)

    admission = sched.arrive(make_spec("f1", max_wait=5.0, config=config), 0.0)

    assert isinstance(admission, Rejected)


def test_queue_full_retry_after_waits_for_the_head_of_the_queue_to_start() -> None:
    config = settings(flex_queue_max_jobs=1, cold_start_tokens_per_slot_second=10.0)
    sched = Scheduler(config, slots=1, now=0.0)
    fill_with_flex(sched, 2, max_tokens=200, config=config)  # f0 runs ~20 s, f1 waits

    admission = sched.arrive(make_spec("f2", config=config), 0.0)

    assert isinstance(admission, Rejected)
    assert admission.retry_after == pytest.approx(20.0)  # not 1 s of hammering


def test_shed_retry_after_does_not_count_the_shed_job_as_work_ahead() -> None:
    config = settings(cold_start_tokens_per_slot_second=10.0, rate_window=1000.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f0", tenant="other", max_tokens=20, config=config))  # ~2 s
    sched.step(0.0)
    admit(sched, make_spec("f", max_tokens=200, max_wait=10.0, config=config))
    admit(sched, make_spec("d", "default", now=1.0, max_tokens=1000, config=config))
    assert sched.step(1.0).preempt == ("f0",)  # the prediction for `f` turned out wrong

    plans = run_until(sched, 10.0, 1.0)

    assert shed_at(plans) == {"f": 10.0}
    (refusal,) = [r for _, p in plans for r in p.shed]
    again = make_spec("again", now=10.0, max_tokens=200, max_wait=10.0, config=config)
    assert refusal.retry_after == pytest.approx(sched.predicted_wait(again, 10.0) - 10.0)


def test_backend_with_every_slot_reserved_rejects_flex_at_once() -> None:
    sched = Scheduler(settings(interactive_reserve=2), slots=2, now=0.0)

    admission = sched.arrive(make_spec("f"), 0.0)

    assert isinstance(admission, Rejected)
    assert admission.retry_after >= 1.0


def test_next_wakeup_ignores_the_deadline_of_a_paused_job() -> None:
    config = settings(rate_window=1000.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f", max_wait=10.0, config=config))
    sched.step(0.0)
    admit(sched, make_spec("d", "default", now=1.0, config=config))
    sched.step(1.0)

    assert sched.next_wakeup() == 1000.0  # the rate window, not the paused job's deadline


# ---- 4. strict between tiers ------------------------------------------------------------


def test_batch_starts_only_when_no_flex_is_queued() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("f0"))
    sched.step(0.0)
    admit(sched, make_spec("b0", "batch", now=1.0, max_wait=86_400))
    admit(sched, make_spec("f1", now=2.0))
    admit(sched, make_spec("f2", now=3.0))
    sched.step(3.0)

    order = start_order(sched, 3, now=4.0)

    assert order == ["f1", "f2", "b0"]


def test_batch_fills_what_flex_leaves() -> None:
    sched = Scheduler(settings(), slots=3, now=0.0)
    admit(sched, make_spec("f0"))
    admit(sched, make_spec("b0", "batch", max_wait=86_400))
    admit(sched, make_spec("b1", "batch", max_wait=86_400))

    assert sorted(sched.step(0.0).start) == ["b0", "b1", "f0"]


# ---- 4. fair within a tier (VTC) --------------------------------------------------------


def drain_one_at_a_time(sched: Scheduler, now: float, tokens: int) -> list[str]:
    """slots=1: run each job to the end, reporting its tokens, and record start order."""
    order: list[str] = []
    while sched.running_ids():
        (job_id,) = sched.running_ids()
        for _ in range(tokens):
            now += 0.05
            sched.token(job_id, now)
        sched.finish(job_id, now)
        order.extend(sched.step(now).start)
    return order


def test_one_tenants_flood_cannot_starve_another_tenant() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    for i in range(50):
        admit(sched, make_spec(f"a{i}", tenant="A", max_tokens=10))
    assert sched.step(0.0).start == ("a0",)
    for i in range(5):
        admit(sched, make_spec(f"b{i}", tenant="B", now=0.1, max_tokens=10))
    sched.step(0.1)

    order = ["a0", *drain_one_at_a_time(sched, 0.1, tokens=10)]

    assert len(order) == 55
    b_positions = [i for i, job_id in enumerate(order) if job_id.startswith("b")]
    assert b_positions == [1, 3, 5, 7, 9]  # interleaved by service received
    assert order[:10:2] == ["a0", "a1", "a2", "a3", "a4"]  # A keeps its deadline order


def test_idle_tenant_is_lifted_and_cannot_bank_credit() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("b_old", tenant="B", max_tokens=10))
    sched.step(0.0)
    order = drain_one_at_a_time(sched, 0.0, tokens=10)  # B served a little, then idle
    assert order == []
    for i in range(20):
        admit(sched, make_spec(f"a{i}", tenant="A", now=1.0, max_tokens=10))
    sched.step(1.0)
    now = 1.0
    for _ in range(10):  # A alone is served a lot while B is idle
        (job_id,) = sched.running_ids()
        for _ in range(10):
            now += 0.05
            sched.token(job_id, now)
        sched.finish(job_id, now)
        sched.step(now)

    for i in range(4):
        admit(sched, make_spec(f"b{i}", tenant="B", now=now, max_tokens=10))
    sched.step(now)
    order = drain_one_at_a_time(sched, now, tokens=10)

    b_positions = [i for i, job_id in enumerate(order) if job_id.startswith("b")]
    assert b_positions == [0, 2, 4, 6]  # alternates; no run of B's jobs on banked credit


def test_preempted_job_of_a_heavy_tenant_waits_its_fair_turn() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("a0", tenant="A", max_tokens=100))
    sched.step(0.0)
    admit(sched, make_spec("b0", tenant="B", now=0.5))  # lifted to A's counter so far
    sched.step(0.5)
    for _ in range(50):
        sched.token("a0", 1.0)
    admit(sched, make_spec("d", "default", now=1.0))
    assert sched.step(1.0).preempt == ("a0",)

    sched.finish("d", 2.0)

    assert sched.step(2.0).start == ("b0",)


# ---- predictions ------------------------------------------------------------------------


def test_predicted_wait_grows_with_queued_work() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("f0", max_tokens=100))
    sched.step(0.0)
    probe = make_spec("probe", tenant="other")

    waits = [sched.predicted_wait(probe, 0.0)]
    for i in range(1, 6):
        admit(sched, make_spec(f"q{i}", tenant=f"t{i}", max_tokens=100))
        waits.append(sched.predicted_wait(probe, 0.0))

    assert waits == sorted(waits)
    assert len(set(waits)) == len(waits)


def test_predicted_wait_is_zero_with_a_free_slot_and_no_queue() -> None:
    sched = Scheduler(settings(), slots=2, now=0.0)
    fill_with_flex(sched, 1)

    assert sched.predicted_wait(make_spec("probe"), 0.0) == 0.0


def test_predicted_wait_shrinks_as_the_measured_rate_grows() -> None:
    config = settings(cold_start_tokens_per_slot_second=5.0, rate_window=1.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f0", max_tokens=1000, config=config))
    sched.step(0.0)
    for i in range(5):
        admit(sched, make_spec(f"q{i}", max_tokens=100, max_wait=10_000, config=config))
    probe = make_spec("probe", tenant="other")
    waits = [sched.predicted_wait(probe, 0.0)]
    rates = [sched.snapshot().tokens_per_slot_second]

    now = 0.0
    for _ in range(6):  # the backend delivers 50 tok/s: each window moves the EWMA up
        for _ in range(10):
            now += 0.1
            sched.token("f0", now, count=5)
        sched.step(now)
        waits.append(sched.predicted_wait(probe, now))
        rates.append(sched.snapshot().tokens_per_slot_second)

    assert rates == sorted(rates)
    assert rates[-1] > 4 * rates[0]
    assert waits == sorted(waits, reverse=True)
    assert waits[-1] < waits[0] / 4


def test_snapshot_counts_queued_and_running_per_tier() -> None:
    sched = Scheduler(settings(), slots=2, now=0.0)
    fill_with_flex(sched, 3)
    admit(sched, make_spec("d", "default", now=1.0))
    sched.step(1.0)

    snap = sched.snapshot()

    assert snap.running == {"priority": 0, "default": 1, "flex": 1, "batch": 0}
    assert snap.queued == {"priority": 0, "default": 0, "flex": 2, "batch": 0}
    assert snap.slots == 2


def test_duplicate_job_id_is_refused() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("x"))

    with pytest.raises(ValueError, match="duplicate"):
        sched.arrive(make_spec("x"), 0.0)


def test_cancelled_queued_job_frees_its_place_in_the_queue_bound() -> None:
    config = settings(flex_queue_max_jobs=1)
    sched = Scheduler(config, slots=1, now=0.0)
    fill_with_flex(sched, 2)  # one running, one queued
    assert isinstance(sched.arrive(make_spec("x"), 0.0), Rejected)

    sched.cancel("f1", 0.5)

    assert isinstance(sched.arrive(make_spec("x", now=0.5), 0.5), Admitted)


def test_requeued_job_resumes_and_is_not_shed() -> None:
    config = settings(flex_max_wait=10.0)
    sched = Scheduler(config, slots=1, now=0.0)
    admit(sched, make_spec("f", config=config))
    sched.step(0.0)
    sched.token("f", 0.5, count=3)

    sched.requeue("f", 1.0)

    assert sched.queued_ids() == ["f"]
    assert sched.step(1.0).start == ("f",)
    job = sched.job("f")
    assert job is not None
    assert job.produced == 3


def test_flex_takes_its_slot_back_from_batch() -> None:
    sched = Scheduler(SchedulerSettings(), slots=2, now=0.0)
    for i in range(2):
        sched.arrive(JobSpec(f"b{i}", "t", "batch", 10, 50, 0.0, 1000.0 + i), 0.0)
    assert set(sched.step(0.0).start) == {"b0", "b1"}
    admission = sched.arrive(JobSpec("f", "t", "flex", 10, 50, 1.0, 5.0), 1.0)
    assert admission == Admitted(predicted_wait=0.0)
    plan = sched.step(1.0)
    assert plan.start == ("f",)
    assert plan.preempt == ("b1",)  # the batch job that loses least: latest deadline
    assert sched.job("b1") is not None and sched.job("b1").phase is Phase.QUEUED  # type: ignore[union-attr]


def test_engine_failure_before_any_token_makes_the_job_sheddable_again() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("f", "flex", max_wait=5.0))
    assert sched.step(0.0).start == ("f",)
    admit(sched, make_spec("d", "default", now=1.0))
    sched.step(1.0)  # the default job preempts f... which had produced nothing
    sched.finish("d", 2.0)
    assert sched.step(2.0).start == ("f",)
    sched.requeue("f", 3.0)  # its engine failed before the first token
    admit(sched, make_spec("d2", "default", now=3.0, max_wait=100.0))
    plans = run_until(sched, 6.0, 3.0)
    assert shed_at(plans) == {"f": 5.0}


def test_a_requeued_job_that_produced_tokens_is_never_shed() -> None:
    sched = Scheduler(settings(), slots=1, now=0.0)
    admit(sched, make_spec("f", "flex", max_wait=5.0))
    sched.step(0.0)
    sched.token("f", 0.5)
    sched.requeue("f", 1.0)
    admit(sched, make_spec("d", "default", now=1.0, max_wait=100.0))
    plans = run_until(sched, 20.0, 1.0)
    assert "f" not in shed_at(plans)


# ---- predictions from what jobs really produce (issue 6, item 14) ------------------------


def complete(sched: Scheduler, job_id: str, tenant: str, produced: int, now: float) -> None:
    admit(sched, make_spec(job_id, now=now, tenant=tenant, max_tokens=32))
    assert sched.step(now).start == (job_id,)
    sched.token(job_id, now, count=produced)
    sched.finish(job_id, now)


def queue_of_eight(sched: Scheduler, now: float) -> float:
    """One job running, eight queued, all answering 24 of 32 tokens: the predicted wait
    of a ninth."""
    for i in range(9):
        admit(sched, make_spec(f"q{i}", now=now, tenant="A", max_tokens=32, prompt=0))
    sched.step(now)
    return sched.predicted_wait(make_spec("probe", now=now, tenant="A", max_tokens=32), now)


def test_predicted_wait_counts_the_tokens_answers_really_have() -> None:
    config = settings(cold_start_tokens_per_slot_second=8.0, rate_window=10_000.0)
    learned = Scheduler(config, slots=1, now=0.0)
    for i in range(20):
        complete(learned, f"past{i}", "A", produced=24, now=0.0)
    cold = Scheduler(config, slots=1, now=0.0)

    # 8 queued x 24 tokens + 24 for the running one, at 8 tokens/s: 27 s, not 8 x 32/8 + 4.
    assert queue_of_eight(learned, 0.0) == pytest.approx(27.0, rel=0.02)
    assert queue_of_eight(cold, 0.0) == pytest.approx(36.0, rel=0.02)  # max_tokens at first


def test_learned_length_never_exceeds_max_tokens_nor_trails_what_a_job_produced() -> None:
    config = settings(cold_start_tokens_per_slot_second=10.0, rate_window=10_000.0)
    sched = Scheduler(config, slots=1, now=0.0)
    for i in range(20):
        complete(sched, f"past{i}", "A", produced=30, now=0.0)
    admit(sched, make_spec("short", tenant="A", max_tokens=5))
    sched.step(0.0)

    probe = make_spec("probe", tenant="B", max_tokens=1)
    assert sched.predicted_wait(probe, 0.0) == pytest.approx(0.5)  # 5 left, not 30

    sched.finish("short", 0.0)
    admit(sched, make_spec("long", tenant="A", max_tokens=100))
    sched.step(0.0)
    sched.token("long", 0.0, count=40)  # past what A's answers usually have
    assert sched.predicted_wait(probe, 0.0) == pytest.approx(0.1)  # one more token at least


def test_cancelled_and_shed_jobs_teach_no_length() -> None:
    config = settings(cold_start_tokens_per_slot_second=8.0, rate_window=10_000.0)
    sched = Scheduler(config, slots=1, now=0.0)
    for i in range(5):
        admit(sched, make_spec(f"gone{i}", tenant="A", max_tokens=32))
        sched.step(0.0)
        sched.token(f"gone{i}", 0.0, count=1)
        sched.cancel(f"gone{i}", 0.0)

    assert queue_of_eight(sched, 0.0) == pytest.approx(36.0, rel=0.02)


def test_next_wakeup_moves_forward_with_a_window_that_is_no_binary_fraction() -> None:
    """A step at exactly `next_wakeup()` closes the rate window (0.02 - 0.01 < 0.01 in
    floating point, which once made the wakeup repeat forever)."""
    sched = Scheduler(settings(rate_window=0.01), slots=1, now=0.0)
    now = 0.0
    for _ in range(100):
        wakeup = sched.next_wakeup()
        assert wakeup > now
        now = wakeup
        sched.step(now)
    assert now == pytest.approx(1.0)


def test_a_backend_that_cannot_pause_yields_only_jobs_that_produced_nothing() -> None:
    """Without continuation a started answer is never cut; a flex job still in its
    prefill (nothing produced) yields its slot and starts again from scratch."""
    sched = Scheduler(settings(), slots=2, can_pause=False)
    admit(sched, make_spec("answering"))
    admit(sched, make_spec("prefilling"))
    assert set(sched.step(0.0).start) == {"answering", "prefilling"}
    sched.token("answering", 0.1)
    admit(sched, make_spec("urgent", "default", now=0.2))
    plan = sched.step(0.2)
    assert plan.preempt == ("prefilling",) and plan.start == ("urgent",)
    admit(sched, make_spec("urgent-2", "default", now=0.3))
    assert sched.step(0.3) == Plan()  # the answering job keeps its slot: urgent-2 waits


def test_capacity_shrinking_below_the_running_jobs_never_starts_more() -> None:
    """A pool that loses a member shrinks `slots` under jobs already running: nothing
    more may start without a preemption (before: free slots went negative, read as free)."""
    sched = Scheduler(settings(), slots=8)
    for n in range(6):
        admit(sched, make_spec(f"d{n}", "default"))
    admit(sched, make_spec("f0"))
    admit(sched, make_spec("f1"))
    assert len(sched.step(0.0).start) == 8
    sched.slots = 4
    admit(sched, make_spec("d6", "default", now=0.1))
    admit(sched, make_spec("f2", now=0.1))
    plan = sched.step(0.1)
    running = len(sched.running_ids())
    assert running <= 8 and "f2" not in plan.start
    assert set(plan.preempt) == {"f0", "f1"}  # flex yields to the shrunk capacity
    assert running == 6 + ("d6" in plan.start)
