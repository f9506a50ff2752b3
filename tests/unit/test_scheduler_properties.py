"""Invariants of the scheduler under random event sequences (Hypothesis).

A small model of each job's status is kept beside the scheduler; after every step the
two must agree and the policy's promises must hold (DESIGN.md, "Scheduling policy").
Time only moves forward, to the next event or to `next_wakeup()`, whichever is first,
as the runtime's loop does, so every deadline is met by a step at exactly that time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexserve.config import SchedulerSettings
from flexserve.scheduling import JobSpec, Plan, Rejected, Scheduler, Tier, is_interactive

TENANTS = ("A", "B", "C")
TERMINAL = frozenset({"finished", "cancelled", "shed", "overloaded"})


@dataclass(frozen=True)
class Arrive:
    dt: float
    tier: Tier
    tenant: str
    prompt: int
    max_tokens: int
    max_wait: float


@dataclass(frozen=True)
class Token:
    dt: float
    pick: int
    count: int


@dataclass(frozen=True)
class Finish:
    dt: float
    pick: int


@dataclass(frozen=True)
class Cancel:
    dt: float
    pick: int


@dataclass(frozen=True)
class Requeue:
    dt: float
    pick: int


@dataclass(frozen=True)
class Tick:
    dt: float


Event = Arrive | Token | Finish | Cancel | Requeue | Tick

gaps = st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 3.0, 10.0])
picks = st.integers(0, 1000)
arrivals = st.builds(
    Arrive,
    dt=gaps,
    tier=st.sampled_from(["priority", "default", "flex", "flex", "batch"]),
    tenant=st.sampled_from(TENANTS),
    prompt=st.integers(0, 200),
    max_tokens=st.integers(1, 200),
    max_wait=st.sampled_from([0.0, 0.5, 2.0, 7.5, 30.0]),
)
events = st.one_of(
    arrivals,
    arrivals,
    st.builds(Token, dt=gaps, pick=picks, count=st.integers(1, 50)),
    st.builds(Finish, dt=gaps, pick=picks),
    st.builds(Cancel, dt=gaps, pick=picks),
    st.builds(Requeue, dt=gaps, pick=picks),
    st.builds(Tick, dt=gaps),
)


def edge_biased(low: int, high: int) -> st.SearchStrategy[int]:
    """Any value in [low, high], with both ends drawn often."""
    return st.one_of(st.just(low), st.just(high), st.integers(low, high))


@st.composite
def scheduler_settings(draw: st.DrawFn) -> tuple[SchedulerSettings, int]:
    """Every valid combination: `0 <= interactive_reserve < slots`, `flex_width_when_busy`
    None or any width from 0 to beyond the slots, queue bounds from 1, every rate and
    weight from its smallest valid value up."""
    slots = draw(edge_biased(1, 8))
    config = SchedulerSettings(
        interactive_max_wait=draw(st.sampled_from([0.0, 0.5, 2.0, 5.0])),
        interactive_reserve=draw(edge_biased(0, slots - 1)),
        flex_width_when_busy=draw(st.none() | edge_biased(0, slots + 1)),
        interactive_slowdown_max=draw(st.none() | st.sampled_from([1.01, 1.25, 3.0])),
        flex_queue_max_jobs=draw(edge_biased(1, 12)),
        flex_queue_max_tokens=draw(st.sampled_from([1, 100, 500, 5000])),
        interactive_queue_max_jobs=draw(edge_biased(1, 12)),
        cold_start_tokens_per_slot_second=draw(st.sampled_from([0.01, 1.0, 20.0, 200.0])),
        rate_window=draw(st.sampled_from([0.1, 0.5, 2.0, 5.0])),
        rate_smoothing=draw(st.sampled_from([0.01, 0.3, 1.0])),
        prefill_token_weight=draw(st.sampled_from([0.0, 0.05, 1.0])),
        output_length_smoothing=draw(st.sampled_from([0.01, 0.2, 1.0])),
    )
    return config, slots


@dataclass
class Harness:
    config: SchedulerSettings
    slots: int
    now: float = 0.0
    sched: Scheduler = field(init=False)
    specs: dict[str, JobSpec] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    requeued_at: dict[str, float] = field(default_factory=dict)
    """Jobs requeued before producing anything: refused at max(deadline, requeue)."""
    count: int = 0

    def __post_init__(self) -> None:
        self.sched = Scheduler(self.config, self.slots, now=self.now)

    # ---- driving --------------------------------------------------------------------

    def run(self, event: Event) -> None:
        self.advance_to(self.now + event.dt)
        promised = self.apply(event)
        plan = self.step()
        if promised is not None:
            assert promised in plan.start, f"{promised} was promised no wait, yet did not start"

    def advance_to(self, when: float) -> None:
        """Step at every wakeup before `when`, then stand at `when`."""
        for _ in range(10_000):
            wakeup = self.sched.next_wakeup()
            if wakeup >= when:
                self.now = when
                return
            assert wakeup >= self.now, "a wakeup in the past"
            self.now = wakeup
            self.step()
        raise AssertionError("next_wakeup() does not move forward")

    def drain(self) -> None:
        """Let time run (nothing finishes) until no job waits for a first start."""
        for _ in range(10_000):
            if not self.waiting_first_start():
                return
            wakeup = self.sched.next_wakeup()
            assert wakeup >= self.now, "a wakeup in the past"
            self.now = wakeup
            self.step()
        raise AssertionError(f"never started nor refused: {self.waiting_first_start()}")

    def waiting_first_start(self) -> list[str]:
        return [j for j, s in self.status.items() if s == "queued" and j not in self.started]

    def with_status(self, *wanted: str) -> list[str]:
        return sorted(j for j, s in self.status.items() if s in wanted)

    def apply(self, event: Event) -> str | None:
        """Apply one event; return the id of a job admitted with no predicted wait."""
        match event:
            case Arrive():
                return self.arrive(event)
            case Token(pick=pick, count=count):
                running = self.with_status("running")
                if running:
                    self.sched.token(running[pick % len(running)], self.now, count)
            case Finish(pick=pick):
                self.end(self.with_status("running"), pick, "finished")
            case Cancel(pick=pick):
                self.end(self.with_status("running", "queued"), pick, "cancelled")
            case Requeue(pick=pick):
                running = self.with_status("running")
                if running:
                    job_id = running[pick % len(running)]
                    produced = self.sched.job(job_id).produced  # type: ignore[union-attr]
                    self.sched.requeue(job_id, self.now)
                    self.status[job_id] = "queued"
                    if produced == 0:  # nothing reached a client: its deadline holds again
                        self.started.discard(job_id)
                        self.requeued_at[job_id] = self.now
            case Tick():
                pass
        return None

    def arrive(self, event: Arrive) -> str | None:
        self.count += 1
        job_id = f"{event.tier[0]}{self.count}"
        wait = self.config.interactive_max_wait if is_interactive(event.tier) else event.max_wait
        spec = JobSpec(
            job_id,
            event.tenant,
            event.tier,
            event.prompt,
            event.max_tokens,
            self.now,
            self.now + wait,
        )
        admission = self.sched.arrive(spec, self.now)
        if isinstance(admission, Rejected):
            self.check_refusal(spec, admission)
            assert admission.retry_after >= 1.0
            assert self.sched.job(job_id) is None
            return None
        assert admission.predicted_wait >= 0.0
        self.specs[job_id] = spec
        self.status[job_id] = "queued"
        return job_id if admission.predicted_wait == 0.0 and not spec.interactive else None

    def check_refusal(self, spec: JobSpec, refusal: Rejected) -> None:
        """Interactive jobs are refused only over their bound; a tenant with nothing
        queued is never shut out of a queue by the count of others' jobs."""
        same_kind = [
            self.specs[j]
            for j in self.with_status("queued")
            if self.specs[j].interactive == spec.interactive
        ]
        if spec.interactive:
            assert len(same_kind) >= self.config.interactive_queue_max_jobs, refusal
        if "queue is full" in refusal.reason:
            assert any(s.tenant == spec.tenant for s in same_kind), refusal

    def end(self, candidates: list[str], pick: int, outcome: str) -> None:
        if not candidates:
            return
        job_id = candidates[pick % len(candidates)]
        (self.sched.finish if outcome == "finished" else self.sched.cancel)(job_id, self.now)
        self.status[job_id] = outcome

    # ---- checking -------------------------------------------------------------------

    def step(self) -> Plan:
        plan = self.sched.step(self.now)
        self.record(plan)
        self.check_state()
        self.check_policy(plan)
        return plan

    def record(self, plan: Plan) -> None:
        assert not set(plan.start) & set(plan.preempt), plan
        for job_id in plan.preempt:
            assert self.status[job_id] == "running", (job_id, self.status[job_id])
            assert not self.specs[job_id].interactive, "interactive work is never preempted"
            self.status[job_id] = "queued"
        for job_id in plan.start:
            assert self.status[job_id] == "queued", (job_id, self.status[job_id])
            self.status[job_id] = "running"
            self.started.add(job_id)
        for refusal in plan.shed:
            self.refuse(refusal.job_id, refusal.retry_after, "shed")
        for refusal in plan.overloaded:
            self.refuse(refusal.job_id, refusal.retry_after, "overloaded")

    def refuse(self, job_id: str, retry_after: float, outcome: str) -> None:
        spec = self.specs[job_id]
        assert self.status[job_id] == "queued", (job_id, self.status[job_id])
        assert job_id not in self.started, f"{job_id} was started, then {outcome}"
        assert spec.interactive == (outcome == "overloaded")
        due = max(spec.deadline, self.requeued_at.get(job_id, spec.deadline))
        assert self.now == due, (job_id, self.now, due)
        assert retry_after >= 1.0
        self.status[job_id] = outcome

    def check_state(self) -> None:
        running = self.with_status("running")
        queued = self.with_status("queued")
        assert sorted(self.sched.running_ids()) == running
        assert sorted(self.sched.queued_ids()) == queued
        for job_id in self.with_status(*TERMINAL):
            assert self.sched.job(job_id) is None
        snap = self.sched.snapshot()
        assert sum(snap.running.values()) == len(running)
        assert sum(snap.queued.values()) == len(queued)

    def check_policy(self, plan: Plan) -> None:
        running = [self.specs[j] for j in self.with_status("running")]
        queued = [self.specs[j] for j in self.with_status("queued")]
        interactive_running = sum(1 for s in running if s.interactive)
        flex_running = len(running) - interactive_running
        free = self.slots - len(running)
        assert free >= 0, "a slot over-committed"
        assert flex_running <= self.slots - self.config.interactive_reserve
        if interactive_running:
            assert flex_running <= self.width_beside_interactive()
        if any(s.interactive for s in queued):
            assert flex_running == 0, "interactive waits while flex holds a slot"
            assert free == 0, "interactive waits beside a free slot"
        if any(not s.interactive for s in queued):
            assert not self.flex_could_start(free, flex_running, interactive_running)
        if any(self.specs[j].tier == "batch" for j in plan.start):
            assert not any(s.tier == "flex" for s in queued), "batch started before flex"

    def flex_could_start(self, free: int, flex_running: int, interactive_running: int) -> bool:
        return (
            free > 0
            and flex_running < self.slots - self.config.interactive_reserve
            and (interactive_running == 0 or flex_running < self.width_beside_interactive())
        )

    def width_beside_interactive(self) -> int:
        """`flex_width_when_busy` and, if set, the latency budget's width (never more
        than the slots: with no interactive work neither applies)."""
        width = self.config.flex_width_when_busy
        widths = [self.slots if width is None else width]
        if self.sched.latency_budget is not None:
            budget = self.sched.latency_budget.width(self.now)
            assert 0 <= budget <= self.slots - 1
            widths.append(budget)
        return min(widths)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=scheduler_settings(), sequence=st.lists(events, min_size=30, max_size=100))
def test_invariants_hold_after_every_step(
    setup: tuple[SchedulerSettings, int], sequence: list[Event]
) -> None:
    config, slots = setup
    harness = Harness(config, slots)
    for event in sequence:
        harness.run(event)
    harness.drain()

    for job_id in harness.specs:
        outcome = harness.status[job_id]
        assert outcome in TERMINAL | {"queued", "running"}
        if outcome == "queued":
            assert job_id in harness.started, "only a paused job may still be queued"


@settings(max_examples=60, deadline=None)
@given(setup=scheduler_settings(), sequence=st.lists(events, min_size=30, max_size=100))
def test_every_job_ends_when_running_jobs_finish(
    setup: tuple[SchedulerSettings, int], sequence: list[Event]
) -> None:
    """Finishing whatever runs, again and again, empties the scheduler: nothing is lost."""
    config, slots = setup
    harness = Harness(config, slots)
    for event in sequence:
        harness.run(event)
    for _ in range(1000):
        running = harness.with_status("running")
        queued = harness.with_status("queued")
        if not running and not queued:
            break
        if running:
            harness.run(Finish(dt=0.5, pick=0))
        else:
            harness.run(Tick(dt=0.5))
    assert harness.sched.running_ids() == []
    assert harness.sched.queued_ids() == []
    assert set(harness.status.values()) <= TERMINAL
