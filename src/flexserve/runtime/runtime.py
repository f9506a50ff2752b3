"""The async shell: the one task that owns the scheduler and drives the backend.

Handlers never touch scheduler state: they `submit` and `cancel`, which post commands;
the loop applies commands in order, asks the scheduler for a plan, and carries it out
(start or cancel backend streams, answer waiters). Stream tasks report tokens back as
commands too, so every scheduler call happens on this one task.

Nobody waits forever: if the loop task dies, every waiter gets a 500 at once, later
submissions too, and `failure` says why (the server exits so that a supervisor restarts
it). On SIGTERM, `shutdown` drains: new work is refused with 503, flex and batch end at
once, interactive work may finish within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from flexserve.backends.base import (
    Backend,
    BackendError,
    EngineRefused,
    Finish,
    NoBackendAvailable,
)
from flexserve.config import SchedulerSettings
from flexserve.errors import (
    EngineFailure,
    FlexserveError,
    Overloaded,
    ResourceUnavailable,
)
from flexserve.runtime.commands import (
    Arrive,
    Cancel,
    Command,
    Drain,
    Ended,
    Produced,
    Retry,
    Wakeup,
)
from flexserve.runtime.events import (
    Done,
    Failed,
    JobHandle,
    Paused,
    Started,
    Submission,
    settled_now,
)
from flexserve.runtime.outcomes import (
    Outcome,
    busy_message,
    cut_outcome,
    refusal,
    runtime_failed,
    shutting_down,
)
from flexserve.runtime.settle_count import Settle, settle_counted
from flexserve.runtime.stream import stream_job
from flexserve.scheduling import (
    Admission,
    JobSpec,
    Plan,
    Rejected,
    Scheduler,
    Snapshot,
    is_interactive,
)
from flexserve.scheduling.jobs import Phase

log = logging.getLogger("flexserve.runtime")

_OVERLOADED = "The server is overloaded with interactive traffic; retry shortly."

MAX_OUTAGE_RETRIES = 600
"""Waits of a flex/batch job for an engine to come back (each at least 0.5 s: a breaker's
cooldown), after which it fails (a job with no deadline left must not wait for ever)."""
MAX_FLEX_ENGINE_RETRIES = 3
"""Resumes of a flex/batch job whose engine failed before it produced anything."""


async def _no_settle(handle: JobHandle, outcome: Outcome) -> None:
    return None


class Runtime:
    def __init__(
        self,
        backend: Backend,
        settings: SchedulerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        settle: Settle = _no_settle,
        stall_timeout: float = 120.0,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.clock = clock
        self.scheduler = Scheduler(
            settings, backend.slots, now=clock(), can_pause=backend.can_pause
        )
        self._settle = settle
        self._stall_timeout = stall_timeout
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._handles: dict[str, JobHandle] = {}
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._settling: set[asyncio.Future[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._alarm: asyncio.TimerHandle | None = None
        """Posts `Wakeup` at the scheduler's next wakeup (`_set_alarm`)."""
        self._alarm_at = math.inf
        self._closing = False
        self._drained = asyncio.Event()
        self.draining = False
        """Shutting down: new work is refused with 503."""
        self.failure: str | None = None
        """Why the loop task died (None while it runs): every job fails with 500."""

    # ---- the handlers' side ---------------------------------------------------------

    def submit(self, submission: Submission) -> JobHandle:
        handle = JobHandle(submission=submission, arrival=self.clock())
        if self.failure is not None:  # no loop would ever answer
            handle.emit(Failed(runtime_failed(self.failure)))
        elif self._closing:
            handle.emit(Failed(shutting_down()))
        else:
            self._commands.put_nowait(Arrive(handle))
        return handle

    def cancel(self, request_id: str) -> None:
        """The client went away: free the slot at once; bill what was produced."""
        self._commands.put_nowait(Cancel(request_id))

    def set_settle(self, settle: Settle) -> None:
        self._settle = settle

    def snapshot(self) -> Snapshot:
        return self.scheduler.snapshot()

    def quote(self, spec: JobSpec) -> Admission:
        """Read-only, so answering it outside the loop task changes no decision."""
        return self.scheduler.would_admit(spec, self.clock())

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="flexserve-runtime")

    async def shutdown(self, grace: float) -> None:
        """Drain: refuse new work (503); end flex/batch jobs now; give running interactive
        jobs `grace` seconds to finish, then end them too. Returns when no job is left
        and every ended job is settled (billed for what its client received)."""
        if self._loop_task is None or self._loop_task.done():
            await self.close()  # no loop to drain through: end what is left now
            return
        self._commands.put_nowait(Drain(cut_interactive=False))
        try:
            async with asyncio.timeout(grace):
                await self._drained.wait()
        except TimeoutError:
            log.warning("shutdown grace of %.1f s over; ending interactive jobs", grace)
            self._commands.put_nowait(Drain(cut_interactive=True))
            await self._drained.wait()
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def close(self) -> None:
        """Stop now: jobs still here end as in a drain cut short (503, streams billed for
        what they received)."""
        self._closing = True
        if self._alarm is not None:
            self._alarm.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        now = self.clock()
        streams = list(self._streams.values())
        self._adopt_unseen_arrivals()
        for handle in list(self._handles.values()):
            self._end_for_shutdown(handle, now)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)  # engines see their close
        await asyncio.gather(*self._settling, return_exceptions=True)

    def _adopt_unseen_arrivals(self) -> None:
        """Arrivals the loop never saw are jobs like any other: they get an answer too."""
        while not self._commands.empty():
            command = self._commands.get_nowait()
            if isinstance(command, Arrive):
                self._handles[command.handle.request_id] = command.handle

    # ---- the loop -------------------------------------------------------------------

    async def _loop(self) -> None:
        """Run the loop; if it dies, answer every waiter (supervision, not recovery: the
        scheduler's state can no longer be trusted, so the process should restart)."""
        try:
            await self._run_loop()
        except asyncio.CancelledError:
            if not self._closing:
                self._die("the runtime task was cancelled")
            raise
        except Exception as error:
            log.exception("runtime task died")
            self._die(f"the runtime task died: {type(error).__name__}")

    async def _run_loop(self) -> None:
        while True:
            command: Command | None = await self._next_command()
            now = self.clock()
            while command is not None:
                self._apply(command, now)
                command = self._commands.get_nowait() if not self._commands.empty() else None
            self._follow_capacity()
            self._carry_out(self.scheduler.step(now), now)
            if self.draining and not self._handles:
                self._drained.set()

    async def _next_command(self) -> Command:
        """The next command; `Wakeup` when the scheduler's next wakeup comes first.

        The wakeup is a timer that posts `Wakeup`, set again only when the wakeup's time
        changes: a timeout around each wait (`asyncio.timeout`, or `asyncio.wait_for` and
        its task) was 2 % of a short request's instructions (bench/instructions.py)."""
        if not self._commands.empty():
            return self._commands.get_nowait()
        self._set_alarm(self.scheduler.next_wakeup())
        return await self._commands.get()

    def _set_alarm(self, when: float) -> None:
        """A `Wakeup` at the scheduler's time `when` (none if infinite), replacing one set
        for another time."""
        if when == self._alarm_at and self._alarm is not None:
            return
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._alarm_at = when
        if math.isfinite(when):
            delay = max(0.0, when - self.clock())
            self._alarm = asyncio.get_running_loop().call_later(delay, self._ring)

    def _ring(self) -> None:
        self._alarm = None
        self._commands.put_nowait(Wakeup())

    def _follow_capacity(self) -> None:
        """A pool's capacity shrinks while a member is out (and grows back)."""
        available = getattr(self.backend, "available_slots", None)
        if available is not None:
            self.scheduler.slots = max(1, int(available()))

    def _die(self, reason: str) -> None:
        self.failure = reason
        error = runtime_failed(reason)
        self._adopt_unseen_arrivals()
        for task in self._streams.values():
            task.cancel()
        for handle in self._handles.values():
            handle.emit(Failed(error))
            self._spawn_settle(handle, cut_outcome(handle))
        self._handles.clear()
        self._drained.set()

    def _apply(self, command: Command, now: float) -> None:
        match command:
            case Arrive(handle):
                self._arrive(handle, now)
            case Produced(request_id):
                self.scheduler.token(request_id, now)
            case Ended(request_id, finish, error):
                self._ended(request_id, finish, error, now)
            case Cancel(request_id):
                self._cancelled(request_id, now)
            case Drain(cut_interactive):
                self._drain(cut_interactive, now)
            case Retry(request_id):
                self._retry(request_id)
            case Wakeup():
                pass  # what it asks for is the step after every command

    def _arrive(self, handle: JobHandle, now: float) -> None:
        sub = handle.submission
        if self.draining:
            self._refuse(handle, shutting_down(), "overloaded")
            return
        spec = JobSpec(
            job_id=sub.request_id,
            tenant=sub.tenant,
            tier=sub.tier,
            prompt_tokens=len(sub.prompt_tokens),
            max_tokens=sub.sampling.max_tokens,
            arrival=now,
            deadline=now + sub.max_wait,
        )
        self._handles[sub.request_id] = handle  # first: if the scheduler fails, it is answered
        admission = self.scheduler.arrive(spec, now)
        if isinstance(admission, Rejected):
            del self._handles[sub.request_id]
            if spec.interactive:  # its queue is full
                full = Overloaded(_OVERLOADED, retry_after=admission.retry_after)
                self._refuse(handle, full, "overloaded")
                return
            error = ResourceUnavailable(
                busy_message(admission.reason), retry_after=admission.retry_after
            )
            self._refuse(handle, error, "shed")

    def _carry_out(self, plan: Plan, now: float) -> None:
        for job_id in plan.preempt:
            self._pause(self._handles[job_id])
        for job_id in plan.start:
            self._run(self._handles[job_id])
        for late in plan.shed:
            error = ResourceUnavailable(
                busy_message("cannot start by its deadline"), retry_after=late.retry_after
            )
            self._refuse(self._handles.pop(late.job_id), error, "shed")
        for waited in plan.overloaded:
            overloaded = Overloaded(_OVERLOADED, retry_after=waited.retry_after)
            self._refuse(self._handles.pop(waited.job_id), overloaded, "overloaded")

    def _run(self, handle: JobHandle) -> None:
        handle.emit(Started(resumed=handle.started))
        handle.started = True
        task = asyncio.create_task(
            stream_job(self.backend, handle, self._commands.put_nowait, self._stall_timeout),
            name=f"stream-{handle.request_id}",
        )
        self._streams[handle.request_id] = task

    def _pause(self, handle: JobHandle) -> None:
        task = self._streams.pop(handle.request_id, None)
        if task is not None:
            task.cancel()
        handle.preemptions += 1
        handle.emit(Paused())
        log.info(
            "preempted request_id=%s tier=%s produced=%d",
            handle.request_id,
            handle.submission.tier,
            len(handle.produced),
        )

    def _refuse(self, handle: JobHandle, error: FlexserveError, outcome: Outcome) -> None:
        handle.emit(Failed(error))
        self._spawn_settle(handle, outcome)

    def _ended(
        self,
        request_id: str,
        finish: Finish | None,
        error: BackendError | EngineRefused | None,
        now: float,
    ) -> None:
        self._streams.pop(request_id, None)
        handle = self._handles.get(request_id)
        if handle is None:
            return
        if finish is not None:
            if finish.prompt_tokens is not None:
                handle.engine_prompt_tokens = finish.prompt_tokens
            self._finish(handle, Done(finish.reason, finish.text), "completed", now)
        elif isinstance(error, NoBackendAvailable):
            self._outage(handle, error, now)
        elif isinstance(error, EngineRefused):
            # The upstream refused on purpose (its own flex 429, a prompt it cannot take):
            # answered the same way, unbilled unless the client already received tokens.
            outcome: Outcome = cut_outcome(handle) if handle.produced else "shed"
            self._finish(handle, Failed(refusal(error)), outcome, now)
        elif self._may_retry(handle):
            handle.engine_failures += 1
            log.warning("engine failed request_id=%s, requeued", request_id)
            self.scheduler.requeue(request_id, now)
            handle.emit(Paused())  # a stream keeps its heartbeats meanwhile
        else:
            failure = EngineFailure(f"The engine failed while generating: {error}")
            self._finish(handle, Failed(failure), "failed", now)

    def _outage(self, handle: JobHandle, error: NoBackendAvailable, now: float) -> None:
        """No engine can run it now. Interactive: 503 with Retry-After. Flex/batch keep
        their slot and try again when a breaker may probe (an outage is not a failure of
        the job), unless a job that never produced passes its deadline: then 429."""
        if is_interactive(handle.submission.tier):
            busy = Overloaded(f"{error}; retry shortly.", retry_after=error.retry_in)
            self._finish(
                handle, Failed(busy), cut_outcome(handle) if handle.produced else "overloaded", now
            )
            return
        handle.outages += 1
        if handle.outages > MAX_OUTAGE_RETRIES:
            failure = EngineFailure(f"No engine came back in time: {error}")
            self._finish(handle, Failed(failure), cut_outcome(handle), now)
            return
        if not handle.produced and now - handle.arrival > handle.submission.max_wait:
            late = ResourceUnavailable(busy_message(str(error)), retry_after=error.retry_in)
            self._finish(handle, Failed(late), "shed", now)
            return
        handle.emit(Paused())  # a stream keeps its heartbeats meanwhile
        retry = Retry(handle.request_id)
        asyncio.get_running_loop().call_later(error.retry_in, self._commands.put_nowait, retry)

    def _retry(self, request_id: str) -> None:
        handle = self._handles.get(request_id)
        job = self.scheduler.job(request_id)
        running = job is not None and job.phase is Phase.RUNNING
        if handle is not None and running and request_id not in self._streams:
            self._run(handle)

    def _may_retry(self, handle: JobHandle) -> bool:
        """flex/batch resume (elsewhere, in a pool), interactive retry once; after tokens
        went out, only on a backend that continues a partial answer."""
        if handle.produced and not self.backend.can_pause:
            return False
        if not is_interactive(handle.submission.tier):
            return handle.engine_failures < MAX_FLEX_ENGINE_RETRIES
        return handle.engine_failures < 1

    def _finish(
        self, handle: JobHandle, event: Done | Failed, outcome: Outcome, now: float
    ) -> None:
        if outcome == "completed":  # only whole answers teach the scheduler their length
            self.scheduler.finish(handle.request_id, now)
        else:
            self.scheduler.cancel(handle.request_id, now)
        self._handles.pop(handle.request_id, None)
        handle.emit(event)
        self._spawn_settle(handle, outcome)

    def _cancelled(self, request_id: str, now: float) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        task = self._streams.pop(request_id, None)
        if task is not None:
            task.cancel()
        self.scheduler.cancel(request_id, now)
        if handle.started:
            self._spawn_settle(handle, "cancelled")

    def _drain(self, cut_interactive: bool, now: float) -> None:
        """Refuse what has not started; end what may not finish (see `shutdown`)."""
        if not self.draining:
            log.info("draining: %d jobs", len(self._handles))
        self.draining = True
        for handle in list(self._handles.values()):
            running = handle.request_id in self._streams
            if cut_interactive or not running or not is_interactive(handle.submission.tier):
                self._end_for_shutdown(handle, now)

    def _end_for_shutdown(self, handle: JobHandle, now: float) -> None:
        """503 (a stream gets it as its last SSE event). Billed for what the client got:
        a stream that received tokens pays for its input and those tokens; a job that
        never started, or whose client gets only this error, pays nothing."""
        task = self._streams.pop(handle.request_id, None)
        if task is not None:
            task.cancel()
        self.scheduler.cancel(handle.request_id, now)  # a cut answer teaches no length
        self._handles.pop(handle.request_id, None)
        handle.emit(Failed(shutting_down()))
        self._spawn_settle(handle, cut_outcome(handle) if handle.started else "overloaded")

    def _spawn_settle(self, handle: JobHandle, outcome: Outcome) -> None:
        settled: asyncio.Future[None]
        try:
            settled = asyncio.ensure_future(
                settle_counted(self.backend, self._settle, handle, outcome)
            )
        except Exception:  # a settle that fails at once must not take the loop down
            log.exception("settling failed request_id=%s", handle.request_id)
            settled = settled_now()
        self._settling.add(settled)
        settled.add_done_callback(self._settling.discard)
        handle.settled = settled
