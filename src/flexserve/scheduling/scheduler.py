"""The pure scheduler: events in, decisions out. No I/O, no clock reads, no asyncio.

Every method takes `now` from the caller (the runtime's clock, or a test's fake one).
Policy (DESIGN.md, "Scheduling policy"):
1. interactive first: start on a free slot, else preempt the flex/batch job that loses
   least, else queue (bounded wait, then `503 overloaded`);
2. flex and batch fill every idle slot (minus `interactive_reserve`, and at most
   `flex_width_when_busy` beside interactive work);
3. flex admission is honest: queued only if predicted to start by its deadline;
4. strict between tiers, token-fair between tenants within one (VTC), then deadline;
5. preempted jobs keep their tokens and are requeued, never shed;
6. (billing lives elsewhere; the scheduler counts tokens once.)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexserve.scheduling.jobs import JobSpec, JobState, Phase
from flexserve.scheduling.plan import Admission, Admitted, Plan, Refusal, Rejected
from flexserve.scheduling.queues import FairQueue, InteractiveQueue
from flexserve.scheduling.rate import ServiceRate
from flexserve.scheduling.tiers import PREEMPTIBLE, RANK, TIERS, Tier

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
    def __init__(self, settings: SchedulerSettings, slots: int, now: float = 0.0) -> None:
        if slots < 1:
            raise ValueError("a backend needs at least one slot")
        self.settings = settings
        self.slots = slots
        self._jobs: dict[str, JobState] = {}
        self._running: dict[str, JobState] = {}
        self._seq = 0
        self._last = now
        self._interactive = InteractiveQueue(self._is_queued)
        self._fair: dict[Tier, FairQueue] = {t: FairQueue(self._is_queued) for t in PREEMPTIBLE}
        self._deadlines: list[tuple[float, int, str]] = []
        self._queued_preemptible = 0
        self._queued_preemptible_tokens = 0
        self._queued_flex = 0
        self.rate = ServiceRate(
            per_slot=settings.cold_start_tokens_per_slot_second,
            window=settings.rate_window,
            smoothing=settings.rate_smoothing,
            _window_start=now,
        )

    # ---- events ---------------------------------------------------------------------

    def arrive(self, spec: JobSpec, now: float) -> Admission:
        """A new job. Interactive jobs are always queued; flex/batch only if honest."""
        self._advance(now)
        if spec.job_id in self._jobs:
            raise ValueError(f"duplicate job id {spec.job_id}")
        wait = 0.0
        if not spec.interactive:
            wait = self.predicted_wait(spec, now)
            refusal = self._refuse_preemptible(spec, now, wait)
            if refusal is not None:
                return refusal
        job = JobState(spec=spec, seq=self._next_seq())
        self._jobs[spec.job_id] = job
        if not spec.interactive:
            self._fair[spec.tier].vtc.join(spec.tenant)
        self._enqueue(job)
        heapq.heappush(self._deadlines, (spec.deadline, job.seq, spec.job_id))
        return Admitted(predicted_wait=wait)

    def token(self, job_id: str, now: float, count: int = 1) -> None:
        """A running job produced `count` output tokens."""
        self._advance(now)
        job = self._jobs.get(job_id)
        if job is None or job.phase is not Phase.RUNNING:
            return
        job.produced += count
        self.rate.observe_tokens(count)
        if not job.spec.interactive:
            self._fair[job.spec.tier].vtc.charge(job.spec.tenant, output_tokens=count)

    def finish(self, job_id: str, now: float) -> None:
        """A job ended (done, failed or cancelled): forget it, free its slot if any."""
        self._advance(now)
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        self._running.pop(job_id, None)
        if job.phase is Phase.QUEUED:
            self._unqueue_counts(job)
        if not job.spec.interactive:
            self._fair[job.spec.tier].vtc.leave(job.spec.tenant)

    cancel = finish

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
        while self._interactive.peek() is not None:
            if self._free_slots() == 0:
                victim = self._victim()
                if victim is None:
                    return
                self._preempt(victim, preempt)
            self._start(self._interactive.pop(), start)

    def _narrow_flex_beside_interactive(self, preempt: list[str]) -> None:
        while self._running_preemptible() > self._flex_limit():
            victim = self._victim()
            assert victim is not None
            self._preempt(victim, preempt)

    def _fill_with_flex(self, start: list[str]) -> None:
        while self._flex_may_start():
            job_id = self._next_preemptible()
            if job_id is None:
                return
            self._start(job_id, start)

    def _flex_displaces_batch(self, start: list[str], preempt: list[str]) -> None:
        """Strict tiers: a queued flex job takes its slot back from a running batch job."""
        while self._fair["flex"].peek() is not None:
            victim = self._victim(among=("batch",))
            if victim is None:
                return
            self._preempt(victim, preempt)
            self._start(self._fair["flex"].pop(), start)

    def _expire(self, now: float) -> tuple[list[Refusal], list[Refusal]]:
        shed: list[Refusal] = []
        overloaded: list[Refusal] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            if not self._awaits_first_start(job_id):
                continue
            spec = self._jobs[job_id].spec
            self.finish(job_id, now)  # first, so that its own work is not ahead of it
            retry = self._retry_after(spec, now)
            (overloaded if spec.interactive else shed).append(Refusal(job_id, retry))
        return shed, overloaded

    # ---- predictions ----------------------------------------------------------------

    def predicted_wait(self, spec: JobSpec, now: float) -> float:
        """Seconds until `spec` would start if queued now (0 if it can start at once)."""
        if spec.interactive:
            return self._interactive_wait()
        if self._flex_may_start() and self._next_preemptible_of_rank(RANK[spec.tier]) is None:
            return 0.0
        if spec.tier == "flex" and self._running_of_tier("batch") > self._queued_flex:
            return 0.0  # it would take a batch job's slot at once
        return self._work_ahead(spec) / self._flex_capacity() + self._time_to_flex_slot()

    def quote(self, spec: JobSpec, now: float) -> float:
        """The wait a request like `spec` would be told now (reads state, changes none)."""
        return self.predicted_wait(spec, now)

    def would_admit(self, spec: JobSpec, now: float) -> Admission:
        """What `arrive(spec)` would answer now, without changing any state."""
        wait = self.predicted_wait(spec, now)
        if not spec.interactive:
            refusal = self._refuse_preemptible(spec, now, wait)
            if refusal is not None:
                return refusal
        return Admitted(predicted_wait=wait)

    def _work_ahead(self, spec: JobSpec) -> float:
        weight = self.settings.prefill_token_weight
        own = 0.0
        others: dict[str, float] = {}
        for job in self._jobs.values():
            if job.phase is not Phase.QUEUED or RANK[job.spec.tier] > RANK[spec.tier]:
                continue
            work = job.remaining_work(weight)
            if job.spec.tier != spec.tier:
                own += work
            elif job.spec.tenant == spec.tenant:
                own += work if job.spec.deadline <= spec.deadline else 0.0
            else:
                others[job.spec.tenant] = others.get(job.spec.tenant, 0.0) + work
        mine = own + _spec_work(spec, weight)
        # Fair sharing: another tenant gets about as much service as ours needs.
        return own + sum(min(work, mine) for work in others.values())

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
        fewest = min(max(1, job.remaining_output()) for job in jobs)
        return fewest / max(self.rate.per_slot, 1e-6)

    def _interactive_wait(self) -> float:
        if self._free_slots() > 0 or self._victim() is not None:
            return 0.0
        return self._time_to_free_slot()

    def _retry_after(self, spec: JobSpec, now: float) -> float:
        wait = self.predicted_wait(spec, now)
        allowed = max(0.0, spec.deadline - spec.arrival)
        return max(MIN_RETRY_AFTER, wait - allowed)

    def _refuse_preemptible(self, spec: JobSpec, now: float, wait: float) -> Rejected | None:
        settings = self.settings
        tokens = spec.prompt_tokens + spec.max_tokens
        late = max(MIN_RETRY_AFTER, wait - max(0.0, spec.deadline - now))
        if self.slots <= settings.interactive_reserve:
            return Rejected(late, "no slot on this backend is open to flex")
        if self._queued_preemptible >= settings.flex_queue_max_jobs:
            return Rejected(self._queue_full_retry(late), "flex queue is full")
        if self._queued_preemptible_tokens + tokens > settings.flex_queue_max_tokens:
            return Rejected(self._queue_full_retry(late), "flex queue token bound reached")
        if now + wait > spec.deadline:
            return Rejected(late, "cannot start by its deadline")
        return None

    def _queue_full_retry(self, late: float) -> float:
        """A full queue has room again only when its head starts."""
        return max(late, self._time_to_flex_slot())

    # ---- state ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        queued = dict.fromkeys(TIERS, 0)
        running = dict.fromkeys(TIERS, 0)
        for job in self._jobs.values():
            (running if job.phase is Phase.RUNNING else queued)[job.spec.tier] += 1
        return Snapshot(
            queued, running, self.slots, self.rate.per_slot, self.rate.interactive_share
        )

    def job(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def running_ids(self) -> list[str]:
        return list(self._running)

    def queued_ids(self) -> list[str]:
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

    def _is_queued(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.phase is Phase.QUEUED

    def _awaits_first_start(self, job_id: str) -> bool:
        """Queued and never started: the only jobs a deadline can refuse."""
        job = self._jobs.get(job_id)
        return job is not None and job.phase is Phase.QUEUED and not job.started

    def _enqueue(self, job: JobState) -> None:
        job.phase = Phase.QUEUED
        self._running.pop(job.spec.job_id, None)
        if job.spec.interactive:
            self._interactive.push(job)
            return
        self._fair[job.spec.tier].push(job)
        self._queued_preemptible += 1
        self._queued_preemptible_tokens += job.spec.prompt_tokens + job.spec.max_tokens
        self._queued_flex += job.spec.tier == "flex"

    def _unqueue_counts(self, job: JobState) -> None:
        if not job.spec.interactive:
            self._queued_preemptible -= 1
            self._queued_preemptible_tokens -= job.spec.prompt_tokens + job.spec.max_tokens
            self._queued_flex -= job.spec.tier == "flex"

    def _start(self, job_id: str, start: list[str]) -> None:
        job = self._jobs[job_id]
        self._unqueue_counts(job)
        job.phase = Phase.RUNNING
        self._running[job_id] = job
        if not job.input_charged and not job.spec.interactive:
            vtc = self._fair[job.spec.tier].vtc
            vtc.charge(job.spec.tenant, input_tokens=job.spec.prompt_tokens)
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
        fewest tokens produced."""
        candidates = [j for j in self._running.values() if j.spec.tier in among]
        if not candidates:
            return None
        loser = max(candidates, key=lambda j: (RANK[j.spec.tier], j.spec.deadline, -j.produced))
        return loser.spec.job_id

    def _next_preemptible(self) -> str | None:
        for tier in PREEMPTIBLE:
            job_id = self._fair[tier].peek()
            if job_id is not None:
                return self._fair[tier].pop()
        return None

    def _next_preemptible_of_rank(self, rank: int) -> str | None:
        """A queued flex/batch job that would start before one of tier rank `rank`."""
        for tier in PREEMPTIBLE:
            if RANK[tier] <= rank and self._fair[tier].peek() is not None:
                return self._fair[tier].peek()
        return None

    def _free_slots(self) -> int:
        return self.slots - self._running_interactive() - self._running_preemptible()

    def _flex_may_start(self) -> bool:
        if self._interactive.peek() is not None or self._free_slots() == 0:
            return False
        return self._running_preemptible() < self._flex_limit()

    def _flex_limit(self) -> int:
        """Most flex/batch jobs that may run now: all slots but the reserve, and at most
        `flex_width_when_busy` beside interactive work."""
        limit = self.slots - self.settings.interactive_reserve
        width = self.settings.flex_width_when_busy
        if width is not None and self._running_interactive() > 0:
            limit = min(limit, width)
        return limit

    def _running_interactive(self) -> int:
        return sum(1 for j in self._running.values() if j.spec.interactive)

    def _running_of_tier(self, tier: Tier) -> int:
        return sum(1 for j in self._running.values() if j.spec.tier == tier)

    def _running_preemptible(self) -> int:
        return sum(1 for j in self._running.values() if not j.spec.interactive)


def _spec_work(spec: JobSpec, prefill_weight: float) -> float:
    return spec.prompt_tokens * prefill_weight + spec.max_tokens
