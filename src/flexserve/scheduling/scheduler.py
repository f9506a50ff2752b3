"""The pure scheduler: events in, decisions out. No I/O, no clock reads, no asyncio.

Every method takes `now` from the caller (the runtime's clock, or a test's fake one).
Policy (DESIGN.md, "Scheduling policy"):
1. interactive first: start on a free slot, else preempt the flex/batch job that loses
   least, else queue (bounded wait, then `503 overloaded`);
2. flex and batch fill every idle slot (minus `interactive_reserve`, and at most
   `flex_width_when_busy` beside interactive work, and, with `interactive_slowdown_max`,
   at most the width the latency budget allows: `LatencyBudget`);
3. flex admission is honest: queued only if predicted to start by its deadline;
4. strict between tiers, token-fair between tenants within one (VTC), then deadline;
5. preempted jobs keep their tokens and are requeued, never shed;
6. (billing lives elsewhere; the scheduler counts tokens once.)

Cost: no event walks the queue. Queued work is kept in per-tier, per-tenant aggregates
(`FairQueue`), counts per tier are counters, so an arrival, a token, a finish or a step
costs O(log n) in the queue's length (plus O(slots) where running jobs are compared).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexserve.scheduling.bounds import FairBound
from flexserve.scheduling.jobs import JobSpec, JobState, Phase
from flexserve.scheduling.latency_budget import LatencyBudget
from flexserve.scheduling.lengths import OutputLengths
from flexserve.scheduling.plan import Admission, Admitted, Plan, Refusal, Rejected
from flexserve.scheduling.queues import FairQueue
from flexserve.scheduling.rate import ServiceRate
from flexserve.scheduling.tiers import INTERACTIVE_ORDER, PREEMPTIBLE, RANK, TIERS, Tier

if TYPE_CHECKING:  # config imports scheduling.tiers; only the type is needed here
    from flexserve.config import SchedulerSettings

MIN_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class Snapshot:
    queued: dict[Tier, int]
    running: dict[Tier, int]
    slots: int
    tokens_per_slot_second: float
    interactive_share: float


class Scheduler:
    def __init__(
        self, settings: SchedulerSettings, slots: int, now: float = 0.0, can_pause: bool = True
    ) -> None:
        if slots < 1:
            raise ValueError("a backend needs at least one slot")
        self.settings = settings
        self.slots = slots
        self.can_pause = can_pause
        """False: the backend cannot resume a partial answer, so no running job is ever
        preempted (interactive work waits for a slot; `interactive_reserve` keeps some)."""
        self._jobs: dict[str, JobState] = {}
        self._running: dict[str, JobState] = {}
        self._running_count: dict[Tier, int] = dict.fromkeys(TIERS, 0)
        self._seq = 0
        self._last = now
        self._queues: dict[Tier, FairQueue] = {tier: FairQueue() for tier in TIERS}
        self._deadlines: list[tuple[float, int, str]] = []
        self._flex_bound = FairBound(settings.flex_queue_max_jobs, settings.flex_queue_max_tokens)
        self._interactive_bound = FairBound(settings.interactive_queue_max_jobs)
        self.lengths = OutputLengths(settings.output_length_smoothing)
        self.rate = ServiceRate(
            per_slot=settings.cold_start_tokens_per_slot_second,
            window=settings.rate_window,
            smoothing=settings.rate_smoothing,
            _window_start=now,
        )
        self.latency_budget = _latency_budget(settings, slots)

    # ---- events ---------------------------------------------------------------------

    def arrive(self, spec: JobSpec, now: float) -> Admission:
        """A new job: queued if its queue has room (fairly shared) and, for flex/batch,
        if it is predicted to start by its deadline; else refused."""
        self._advance(now)
        if spec.job_id in self._jobs:
            raise ValueError(f"duplicate job id {spec.job_id}")
        admission = self.would_admit(spec, now)
        if isinstance(admission, Rejected):
            return admission
        job = JobState(spec=spec, seq=self._next_seq())
        self._jobs[spec.job_id] = job
        self._queues[spec.tier].vtc.join(spec.tenant)
        self._enqueue(job)
        heapq.heappush(self._deadlines, (spec.deadline, job.seq, spec.job_id))
        return admission

    def token(self, job_id: str, now: float, count: int = 1) -> None:
        """A running job produced `count` output tokens."""
        self._advance(now)
        job = self._jobs.get(job_id)
        if job is None or job.phase is not Phase.RUNNING:
            return
        job.produced += count
        self.rate.observe_tokens(count)
        if self.latency_budget is not None and job.spec.interactive:
            self.latency_budget.token(job_id, now, self._running_preemptible(), count)
        self._queues[job.spec.tier].charge(job.spec.tenant, output_tokens=count)

    def finish(self, job_id: str, now: float) -> None:
        """A job completed its answer: forget it, free its slot, learn its length."""
        job = self._forget(job_id, now)
        if job is not None:
            self.lengths.observe(job.spec.tenant, job.produced)

    def cancel(self, job_id: str, now: float) -> None:
        """A job ended without a whole answer (client gone, engine failed): forget it."""
        self._forget(job_id, now)

    def requeue(self, job_id: str, now: float) -> None:
        """A running job lost its stream (e.g. a backend error): queue it to resume.

        If it produced nothing it is again a job waiting for its first start, so its
        deadline applies again (DESIGN: "requeued until its deadline").
        """
        self._advance(now)
        job = self._jobs.get(job_id)
        if job is None or job.phase is not Phase.RUNNING:
            return
        self._enqueue(job)
        if job.produced == 0:
            job.started = False
            heapq.heappush(self._deadlines, (job.spec.deadline, job.seq, job_id))

    # ---- decisions ------------------------------------------------------------------

    def step(self, now: float) -> Plan:
        self._advance(now)
        start: list[str] = []
        preempt: list[str] = []
        self._admit_interactive(start, preempt)
        self._narrow_flex_beside_interactive(preempt)
        self._fill_with_flex(start)
        self._flex_displaces_batch(start, preempt)
        shed, overloaded = self._expire(now)
        return Plan(tuple(start), tuple(preempt), tuple(shed), tuple(overloaded))

    def next_wakeup(self) -> float:
        """When `step` must run again even if no event arrives (a deadline or a window)."""
        while self._deadlines and not self._awaits_first_start(self._deadlines[0][2]):
            heapq.heappop(self._deadlines)
        wakeup = self.rate.next_roll()
        if self._deadlines:
            wakeup = min(wakeup, self._deadlines[0][0])
        return wakeup

    def _admit_interactive(self, start: list[str], preempt: list[str]) -> None:
        while (queue := self._interactive_queue()) is not None:
            if self._free_slots() == 0:
                victim = self._victim()
                if victim is None:
                    return
                self._preempt(victim, preempt)
            self._start(queue.pop(), start)

    def _narrow_flex_beside_interactive(self, preempt: list[str]) -> None:
        while self._running_preemptible() > self._flex_limit():
            victim = self._victim()
            if victim is None:  # a backend that cannot pause: narrowing waits for ends
                return
            self._preempt(victim, preempt)

    def _fill_with_flex(self, start: list[str]) -> None:
        while self._flex_may_start():
            queue = self._preemptible_queue()
            if queue is None:
                return
            self._start(queue.pop(), start)

    def _flex_displaces_batch(self, start: list[str], preempt: list[str]) -> None:
        """Strict tiers: a queued flex job takes its slot back from a running batch job."""
        while self._queues["flex"]:
            victim = self._victim(among=("batch",))
            if victim is None:
                return
            self._preempt(victim, preempt)
            self._start(self._queues["flex"].pop(), start)

    def _expire(self, now: float) -> tuple[list[Refusal], list[Refusal]]:
        shed: list[Refusal] = []
        overloaded: list[Refusal] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            if not self._awaits_first_start(job_id):
                continue
            spec = self._jobs[job_id].spec
            self._forget(job_id, now)  # first, so that its own work is not ahead of it
            retry = self._retry_after(spec, now)
            (overloaded if spec.interactive else shed).append(Refusal(job_id, retry))
        return shed, overloaded

    # ---- predictions ----------------------------------------------------------------

    def would_admit(self, spec: JobSpec, now: float) -> Admission:
        """What `arrive(spec)` would answer now, without changing any state: the one
        function behind admission, `Retry-After` and the quote endpoint."""
        wait = self.predicted_wait(spec, now)
        refusal = self._refusal(spec, now, wait)
        return refusal if refusal is not None else Admitted(predicted_wait=wait)

    def predicted_wait(self, spec: JobSpec, now: float) -> float:
        """Seconds until `spec` would start if queued now (0 if it can start at once)."""
        if spec.interactive:
            return self._interactive_wait()
        if self._flex_may_start() and self._preemptible_queue(RANK[spec.tier]) is None:
            return 0.0
        if spec.tier == "flex" and self._running_count["batch"] > len(self._queues["flex"]):
            return 0.0  # it would take a batch job's slot at once
        return self._work_ahead(spec) / self._flex_capacity() + self._time_to_flex_slot()

    def _work_ahead(self, spec: JobSpec) -> float:
        """Token-equivalents that start before `spec` would: every queued job of a higher
        tier, its own tenant's jobs with no later deadline, and from each other tenant
        of its tier about as much as its own tenant gets meanwhile (fair sharing)."""
        higher = sum(self._queues[t].total_work for t in TIERS if RANK[t] < RANK[spec.tier])
        own_work = self._spec_work(spec)
        tier = self._queues[spec.tier].ahead(spec.tenant, spec.deadline, own_work)
        return higher + tier.own + tier.others

    def _spec_work(self, spec: JobSpec) -> float:
        output = self.lengths.expected_total(spec.tenant, spec.max_tokens)
        return spec.prompt_tokens * self.settings.prefill_token_weight + output

    def _queued_work(self, job: JobState) -> float:
        """A (re)queued job's remaining work: re-prefill of prompt + output so far, then
        the output it is expected to still produce."""
        prefill = (job.spec.prompt_tokens + job.produced) * self.settings.prefill_token_weight
        return prefill + self._expected_remaining(job)

    def _expected_remaining(self, job: JobState) -> float:
        spec = job.spec
        return self.lengths.expected_remaining(spec.tenant, spec.max_tokens, job.produced)

    def _flex_capacity(self) -> float:
        flex_slots = max(1, self.slots - self.settings.interactive_reserve)
        share = max(0.0, 1.0 - self.rate.interactive_share)
        return max(self.rate.per_slot * flex_slots * max(share, 0.05), 1e-6)

    def _time_to_free_slot(self) -> float:
        """Seconds until any slot frees (0 if one is free)."""
        if self._free_slots() > 0:
            return 0.0
        return self._time_to_first_end(list(self._running.values()))

    def _time_to_flex_slot(self) -> float:
        """Seconds until flex/batch may take one more slot (0 if it may now).

        A free slot is not enough: the reserve and the width beside interactive work can
        keep flex out of it, and then only the end of a running flex/batch job lets it in.
        """
        if self._flex_may_start():
            return 0.0
        preemptible = [j for j in self._running.values() if not j.spec.interactive]
        if preemptible and len(preemptible) >= self._flex_limit():
            return self._time_to_first_end(preemptible)
        return self._time_to_first_end(list(self._running.values()))

    def _time_to_first_end(self, jobs: list[JobState]) -> float:
        """A running job that has reached its cap still owes its finish: count one token."""
        if not jobs:
            return 0.0
        fewest = min(max(1.0, self._expected_remaining(job)) for job in jobs)
        return fewest / max(self.rate.per_slot, 1e-6)

    def _interactive_wait(self) -> float:
        if self._free_slots() > 0 or self._victim() is not None:
            return 0.0
        return self._time_to_free_slot()

    def _retry_after(self, spec: JobSpec, now: float) -> float:
        wait = self.predicted_wait(spec, now)
        allowed = max(0.0, spec.deadline - spec.arrival)
        return max(MIN_RETRY_AFTER, wait - allowed)

    def _refusal(self, spec: JobSpec, now: float, wait: float) -> Rejected | None:
        late = max(MIN_RETRY_AFTER, wait - max(0.0, spec.deadline - now))
        if spec.interactive:
            full = self._interactive_bound.refusal(spec.tenant, 0)
            if full is not None:
                return Rejected(max(late, self._time_to_free_slot()), f"interactive {full}")
            return None
        if self.slots <= self.settings.interactive_reserve:
            return Rejected(late, "no slot on this backend is open to flex")
        full = self._flex_bound.refusal(spec.tenant, spec.prompt_tokens + spec.max_tokens)
        if full is not None:
            return Rejected(self._queue_full_retry(late), f"flex {full}")
        if now + wait > spec.deadline:
            return Rejected(late, "cannot start by its deadline")
        return None

    def _queue_full_retry(self, late: float) -> float:
        """A full queue has room again only when its head starts."""
        return max(late, self._time_to_flex_slot())

    # ---- state ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        queued = {tier: len(self._queues[tier]) for tier in TIERS}
        return Snapshot(
            queued,
            dict(self._running_count),
            self.slots,
            self.rate.per_slot,
            self.rate.interactive_share,
        )

    def job(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def running_ids(self) -> list[str]:
        return list(self._running)

    def queued_ids(self) -> list[str]:
        """Every queued job, O(n): for tests and diagnostics, never on an event's path."""
        return [j.spec.job_id for j in self._jobs.values() if j.phase is Phase.QUEUED]

    def _advance(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        if elapsed > 0:
            interactive = self._running_interactive()
            running = interactive + self._running_preemptible()
            self.rate.observe_busy(self.slots, running, interactive, elapsed)
            self._last = now
        self.rate.roll(max(now, self._last))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _awaits_first_start(self, job_id: str) -> bool:
        """Queued and never started: the only jobs a deadline can refuse."""
        job = self._jobs.get(job_id)
        return job is not None and job.phase is Phase.QUEUED and not job.started

    def _forget(self, job_id: str, now: float) -> JobState | None:
        self._advance(now)
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        if job.phase is Phase.QUEUED:
            self._queues[job.spec.tier].remove(job)
            self._unqueue_counts(job)
        else:
            self._stop_running(job)
        self._queues[job.spec.tier].vtc.leave(job.spec.tenant)
        return job

    def _bound(self, job: JobState) -> FairBound:
        return self._interactive_bound if job.spec.interactive else self._flex_bound

    def _enqueue(self, job: JobState) -> None:
        if job.phase is Phase.RUNNING:
            self._stop_running(job)
        job.phase = Phase.QUEUED
        job.queued_work = self._queued_work(job)
        self._queues[job.spec.tier].push(job)
        self._bound(job).add(job.spec.tenant, _bound_tokens(job))

    def _unqueue_counts(self, job: JobState) -> None:
        self._bound(job).discard(job.spec.tenant, _bound_tokens(job))

    def _stop_running(self, job: JobState) -> None:
        del self._running[job.spec.job_id]
        self._running_count[job.spec.tier] -= 1
        if self.latency_budget is not None:
            self.latency_budget.forget(job.spec.job_id)

    def _start(self, job_id: str, start: list[str]) -> None:
        """`job_id` was just popped from its queue."""
        job = self._jobs[job_id]
        self._unqueue_counts(job)
        job.phase = Phase.RUNNING
        self._running[job_id] = job
        self._running_count[job.spec.tier] += 1
        if not job.input_charged:
            self._queues[job.spec.tier].charge(job.spec.tenant, input_tokens=job.spec.prompt_tokens)
            job.input_charged = True
        job.started = True
        start.append(job_id)

    def _preempt(self, job_id: str, preempt: list[str]) -> None:
        job = self._jobs[job_id]
        job.preemptions += 1
        self._enqueue(job)
        preempt.append(job_id)

    def _victim(self, among: tuple[Tier, ...] = PREEMPTIBLE) -> str | None:
        """The running flex/batch job that loses least: lowest tier, latest deadline,
        fewest tokens produced. (A scan of the running jobs: at most `slots`.)"""
        candidates = [j for j in self._running.values() if j.spec.tier in among]
        if not self.can_pause:  # a job that produced nothing starts again from scratch
            candidates = [j for j in candidates if j.produced == 0]
        if not candidates:
            return None
        loser = max(candidates, key=lambda j: (RANK[j.spec.tier], j.spec.deadline, -j.produced))
        return loser.spec.job_id

    def _interactive_queue(self) -> FairQueue | None:
        """The queue of the next interactive job to start: priority before default."""
        for tier in INTERACTIVE_ORDER:
            if self._queues[tier]:
                return self._queues[tier]
        return None

    def _preemptible_queue(self, rank: int = len(TIERS)) -> FairQueue | None:
        """The queue of the next flex/batch job to start, among tiers of rank <= `rank`."""
        for tier in PREEMPTIBLE:
            if RANK[tier] <= rank and self._queues[tier]:
                return self._queues[tier]
        return None

    def _free_slots(self) -> int:
        """Never below 0: a pool's capacity can shrink under jobs already running."""
        return max(0, self.slots - len(self._running))

    def _flex_may_start(self) -> bool:
        if self._interactive_queue() is not None or self._free_slots() == 0:
            return False
        return self._running_preemptible() < self._flex_limit()

    def _flex_limit(self) -> int:
        """Most flex/batch jobs that may run now: all slots but the reserve, and beside
        interactive work at most `flex_width_when_busy` and what the latency budget
        allows (as of the newest event: the budget changes only with events)."""
        limit = self.slots - self.settings.interactive_reserve
        if self._running_interactive() == 0:
            return limit
        # what interactive work leaves (less than the rest when capacity shrank under it)
        limit = min(limit, max(0, self.slots - self._running_interactive()))
        width = self.settings.flex_width_when_busy
        if width is not None:
            limit = min(limit, width)
        if self.latency_budget is not None and self.can_pause:
            # (a backend that cannot pause could never run interactive work alone to
            # measure its baseline: the budget would keep flex out for good)
            limit = min(limit, self.latency_budget.width(self._last))
        return limit

    def _running_interactive(self) -> int:
        return self._running_count["priority"] + self._running_count["default"]

    def _running_preemptible(self) -> int:
        return self._running_count["flex"] + self._running_count["batch"]


def _latency_budget(settings: SchedulerSettings, slots: int) -> LatencyBudget | None:
    """The controller of flex width beside interactive work, if a budget is set."""
    budget = settings.interactive_slowdown_max
    if budget is None:
        return None
    widest = slots - max(1, settings.interactive_reserve)  # an interactive job holds one
    if settings.flex_width_when_busy is not None:
        widest = min(widest, settings.flex_width_when_busy)
    return LatencyBudget(budget=budget, max_width=max(0, widest))


def _bound_tokens(job: JobState) -> int:
    return job.spec.prompt_tokens + job.spec.max_tokens
