"""What one event costs the scheduler must not grow with the queue (issue 6, item 13).

Work is counted, not timed: every Python and C function call the scheduler makes while
it handles one event, under `sys.setprofile`. A scan of the queue costs calls in
proportion to its length; the incremental aggregates cost O(log n).
Beside that, the aggregates must equal a brute-force recomputation (Hypothesis).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flexserve.config import SchedulerSettings
from flexserve.scheduling import Admitted, JobSpec, Phase, Scheduler, Tier
from flexserve.scheduling.tiers import RANK

TENANT_SIZE = 5
"""Queued jobs per tenant: a longer queue also has more tenants."""


def calls_during(action: Callable[[], object]) -> int:
    count = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return count


def backlog(queued: int) -> Scheduler:
    """One slot busy with a flex job; `queued` flex jobs behind it, over many tenants."""
    config = SchedulerSettings(
        flex_queue_max_jobs=10 * queued,
        flex_queue_max_tokens=10**9,
        cold_start_tokens_per_slot_second=10_000.0,  # every one of them fits its deadline
    )
    sched = Scheduler(config, slots=1, now=0.0)
    for i in range(queued + 1):
        spec = JobSpec(f"f{i}", f"t{i // TENANT_SIZE}", "flex", 20, 30, 0.0, 540.0 + i % 7)
        assert isinstance(sched.arrive(spec, 0.0), Admitted)
        sched.step(0.0)
    return sched


def cost_of_one_of_each_event(sched: Scheduler) -> dict[str, int]:
    running = sched.running_ids()[0]
    arrival = JobSpec("new", "newcomer", "flex", 20, 30, 1.0, 541.0)
    interactive = JobSpec("d", "someone", "default", 20, 30, 1.0, 31.0)
    costs = {
        "flex arrival": calls_during(lambda: sched.arrive(arrival, 1.0)),
        "step": calls_during(lambda: sched.step(1.0)),
        "token": calls_during(lambda: sched.token(running, 1.5, 3)),
        "quote": calls_during(lambda: sched.would_admit(arrival, 1.5)),
        "interactive arrival + preempting step": calls_during(
            lambda: (sched.arrive(interactive, 2.0), sched.step(2.0))
        ),
        "finish + next start": calls_during(lambda: (sched.finish("d", 3.0), sched.step(3.0))),
    }
    queued = sched.queued_ids()[-1]
    costs["cancel a queued job"] = calls_during(lambda: sched.cancel(queued, 3.0))
    return costs


def test_per_event_work_does_not_grow_with_the_queue() -> None:
    small = cost_of_one_of_each_event(backlog(20))
    large = cost_of_one_of_each_event(backlog(2000))  # 100 times the queue and tenants

    for event, calls in large.items():
        # O(log n) at most doubles or so from 20 to 2000; a scan would grow 100-fold.
        assert calls <= 3 * small[event] + 50, (event, small[event], calls)


# ---- the aggregates against a brute-force recomputation -----------------------------


def brute_work_ahead(sched: Scheduler, spec: JobSpec) -> float:
    """DESIGN's definition, by walking every job."""
    higher = own = 0.0
    others: dict[str, float] = {}
    for job in sched._jobs.values():
        if job.phase is not Phase.QUEUED or RANK[job.spec.tier] > RANK[spec.tier]:
            continue
        if job.spec.tier != spec.tier:
            higher += job.queued_work
        elif job.spec.tenant == spec.tenant:
            own += job.queued_work if job.spec.deadline <= spec.deadline else 0.0
        else:
            others[job.spec.tenant] = others.get(job.spec.tenant, 0.0) + job.queued_work
    mine = own + sched._spec_work(spec)
    return higher + own + sum(min(work, mine) for work in others.values())


TIERS: list[Tier] = ["priority", "default", "flex", "flex", "batch"]
operations = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "arrive", "arrive", "step", "token", "finish", "cancel"]),
        st.sampled_from(TIERS),
        st.sampled_from("ABCD"),
        st.integers(0, 100),  # prompt
        st.integers(1, 100),  # max_tokens, or a pick among jobs
        st.sampled_from([0.0, 1.0, 5.0, 50.0, 540.0]),  # wait allowed
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, slots=st.integers(1, 3))
def test_incremental_aggregates_equal_a_brute_force_recomputation(
    ops: list[tuple[str, Tier, str, int, int, float]], slots: int
) -> None:
    sched = Scheduler(SchedulerSettings(), slots=slots, now=0.0)
    now = 0.0
    for index, (op, tier, tenant, prompt, number, wait) in enumerate(ops):
        now += 0.25
        jobs = sorted(sched._jobs)
        if op == "arrive":
            sched.arrive(JobSpec(f"j{index}", tenant, tier, prompt, number, now, now + wait), now)
        elif op == "step":
            sched.step(now)
        elif op == "token" and sched.running_ids():
            sched.token(sorted(sched.running_ids())[number % len(sched.running_ids())], now, 3)
        elif op in ("finish", "cancel") and jobs:
            getattr(sched, op)(jobs[number % len(jobs)], now)

        for probe_tier in ("flex", "batch"):
            for probe_tenant in ("A", "E"):
                probe = JobSpec("probe", probe_tenant, probe_tier, prompt, number, now, now + wait)
                expected = brute_work_ahead(sched, probe)
                assert math.isclose(sched._work_ahead(probe), expected, abs_tol=1e-6)
        snap = sched.snapshot()
        for t in ("priority", "default", "flex", "batch"):
            queued = [j for j in sched._jobs.values() if j.spec.tier == t]
            assert snap.queued[t] == sum(j.phase is Phase.QUEUED for j in queued)
            assert snap.running[t] == sum(j.phase is Phase.RUNNING for j in queued)
