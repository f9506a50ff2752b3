"""Virtual token counters (VTC) and the fair queue built on them."""

from __future__ import annotations

from flexserve.config import SchedulerSettings
from flexserve.scheduling import Admitted, JobSpec, JobState, Rejected, Scheduler, Tier
from flexserve.scheduling.fairness import VirtualTokenCounter
from flexserve.scheduling.queues import FairQueue


def test_service_is_weighted_input_one_output_two() -> None:
    vtc = VirtualTokenCounter()
    vtc.join("A")

    vtc.charge("A", input_tokens=10, output_tokens=5)

    assert vtc.counter("A") == 20.0


def test_tenant_that_becomes_active_is_lifted_to_the_smallest_active_counter() -> None:
    vtc = VirtualTokenCounter()
    for tenant in ("A", "B", "C"):
        vtc.join(tenant)
    vtc.charge("A", output_tokens=500)  # 1000
    vtc.charge("B", output_tokens=150)  # 300
    vtc.leave("C")  # C idles at 0 while A and B are served

    vtc.join("C")

    assert vtc.counter("C") == 300.0  # the smallest active, not the largest


def test_tenant_ahead_of_the_others_is_not_lowered_on_joining() -> None:
    vtc = VirtualTokenCounter()
    vtc.join("A")
    vtc.charge("A", output_tokens=100)
    vtc.leave("A")
    vtc.join("B")

    vtc.join("A")

    assert vtc.counter("A") == 200.0


def test_tenant_already_active_is_not_lifted_by_another_job() -> None:
    vtc = VirtualTokenCounter()
    vtc.join("A")
    vtc.join("B")
    vtc.charge("A", output_tokens=100)

    vtc.join("B")  # a second job of an active tenant

    assert vtc.counter("B") == 0.0


def test_tenant_stays_active_until_its_last_job_leaves() -> None:
    vtc = VirtualTokenCounter()
    vtc.join("A")
    vtc.join("A")
    vtc.join("B")
    vtc.leave("B")
    vtc.charge("A", output_tokens=100)
    vtc.leave("A")  # one of A's two jobs

    vtc.join("B")

    assert vtc.counter("B") == 200.0


def test_idle_moment_banks_no_credit() -> None:
    """A idles while B is served; then everyone is idle; A must not come back ahead."""
    vtc = VirtualTokenCounter()
    vtc.join("A")
    vtc.charge("A", output_tokens=10)  # 20
    vtc.leave("A")
    vtc.join("B")  # lifted to the 20 A left with
    vtc.charge("B", output_tokens=1000)  # 2020
    vtc.leave("B")  # nobody active

    vtc.join("A")

    assert vtc.counter("A") == 2020.0


def job(job_id: str, tenant: str, deadline: float, seq: int) -> JobState:
    return JobState(JobSpec(job_id, tenant, "flex", 10, 10, 0.0, deadline), seq=seq)


def test_fair_queue_serves_least_service_first_then_earliest_deadline() -> None:
    queue = FairQueue()
    for tenant in ("A", "B"):
        queue.vtc.join(tenant)
    queue.push(job("a1", "A", deadline=50.0, seq=1))
    queue.push(job("a2", "A", deadline=10.0, seq=2))
    queue.push(job("b1", "B", deadline=90.0, seq=3))
    queue.push(job("b2", "B", deadline=80.0, seq=4))
    queue.charge("A", input_tokens=1)

    assert queue.pop() == "b2"  # B has had less; its earliest deadline first
    queue.charge("B", input_tokens=5)
    assert queue.pop() == "a2"
    assert queue.pop() == "a1"
    assert queue.pop() == "b1"
    assert queue.peek() is None


def test_fair_queue_forgets_a_removed_job_and_its_tenant() -> None:
    queue = FairQueue()
    a1 = job("a1", "A", deadline=1.0, seq=1)
    queue.push(a1)
    queue.push(job("b1", "B", deadline=2.0, seq=2))

    queue.remove(a1)  # cancelled

    assert queue.peek() == "b1"
    assert len(queue) == 1
    assert queue.jobs_of("A") == 0


def test_whole_system_idle_then_both_tenants_return() -> None:
    """Through the scheduler: the light tenant that idled first does not run three in a row."""
    settings = SchedulerSettings()
    sched = Scheduler(settings, slots=1, now=0.0)

    def serve(job_id: str, tenant: str, now: float, tokens: int) -> float:
        spec = JobSpec(job_id, tenant, "flex", 10, tokens, now, now + 540.0)
        assert isinstance(sched.arrive(spec, now), Admitted)
        assert sched.step(now).start == (job_id,)
        sched.token(job_id, now + 1.0, count=tokens)
        sched.finish(job_id, now + 1.0)
        return now + 1.0

    now = serve("b_old", "B", 0.0, tokens=10)  # B: a little service, then idle
    for i in range(5):
        now = serve(f"a_old{i}", "A", now, tokens=100)  # A alone: much service
    now += 60.0  # nobody at all
    for i in range(3):
        spec = JobSpec(f"b{i}", "B", "flex", 10, 10, now, now + 540.0)
        assert isinstance(sched.arrive(spec, now), Admitted)
    for i in range(3):
        spec = JobSpec(f"a{i}", "A", "flex", 10, 10, now, now + 540.0)
        assert isinstance(sched.arrive(spec, now), Admitted)

    order = list(sched.step(now).start)
    while sched.running_ids():
        (job_id,) = sched.running_ids()
        now += 1.0
        sched.token(job_id, now, count=10)
        sched.finish(job_id, now)
        order.extend(sched.step(now).start)

    assert order[:4] in (["b0", "a0", "b1", "a1"], ["a0", "b0", "a1", "b1"])


# ---- fair admission: queue bounds shared between tenants (issue 6, item 3) ---------------


def flood(sched: Scheduler, tenant: str, tier: Tier, count: int, now: float) -> int:
    """`count` tiny requests of `tenant`; how many were admitted."""
    admitted = 0
    for i in range(count):
        spec = JobSpec(f"{tenant}{i}", tenant, tier, 1, 1, now, now + 540.0)
        admitted += isinstance(sched.arrive(spec, now), Admitted)
        sched.step(now)
    return admitted


def serve_in_order(sched: Scheduler, now: float, count: int) -> list[str]:
    """Finish whatever runs, `count` times; which jobs start, in order."""
    order: list[str] = []
    for _ in range(count):
        for job_id in sched.running_ids():
            sched.token(job_id, now, 1)
            sched.finish(job_id, now)
        order.extend(sched.step(now).start)
        now += 0.1
    return order


def test_one_tenants_flood_of_tiny_flex_requests_cannot_lock_another_tenant_out() -> None:
    config = SchedulerSettings(flex_queue_max_jobs=100, cold_start_tokens_per_slot_second=1000)
    sched = Scheduler(config, slots=1, now=0.0)
    assert flood(sched, "A", "flex", 500, 0.0) == 101  # one running, the queue full

    admissions = [
        sched.arrive(JobSpec(f"b{i}", "B", "flex", 1, 1, 1.0, 541.0), 1.0) for i in range(3)
    ]

    assert all(isinstance(a, Admitted) for a in admissions), admissions
    started = serve_in_order(sched, 1.0, 8)
    assert {"b0", "b1", "b2"} <= set(started[:6])  # B's fair share: every other start


def test_flood_over_the_token_bound_leaves_room_for_another_tenant() -> None:
    config = SchedulerSettings(flex_queue_max_tokens=200, cold_start_tokens_per_slot_second=1000)
    sched = Scheduler(config, slots=1, now=0.0)
    flood(sched, "A", "batch", 500, 0.0)  # 2 tokens each: 100 queued

    admission = sched.arrive(JobSpec("b", "B", "batch", 10, 10, 1.0, 541.0), 1.0)

    assert isinstance(admission, Admitted), admission


def test_flooding_tenant_over_its_share_is_still_refused() -> None:
    config = SchedulerSettings(flex_queue_max_jobs=100, cold_start_tokens_per_slot_second=1000)
    sched = Scheduler(config, slots=1, now=0.0)
    flood(sched, "A", "flex", 200, 0.0)
    flood(sched, "B", "flex", 200, 0.0)  # B gets its half of the bound, not more

    refused = sched.arrive(JobSpec("a-more", "A", "flex", 1, 1, 1.0, 541.0), 1.0)

    assert sched.snapshot().queued["flex"] == 150
    assert isinstance(refused, Rejected) and "full" in refused.reason


def test_interactive_queue_is_bounded_and_shared_fairly() -> None:
    config = SchedulerSettings(interactive_queue_max_jobs=10)
    sched = Scheduler(config, slots=1, now=0.0)
    assert flood(sched, "A", "default", 50, 0.0) == 11  # one running, ten queued

    b = sched.arrive(JobSpec("b", "B", "default", 1, 1, 1.0, 31.0), 1.0)

    assert isinstance(b, Admitted)
    assert serve_in_order(sched, 1.0, 3)[:2] in (["b", "A1"], ["A1", "b"])
