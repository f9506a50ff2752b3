"""The llama.cpp engine loop behind the embedded backend: continuous batching on one thread.

One thread owns the llama.cpp context. Each step it decodes every active sequence with
ONE `llama_decode`: one token per generating sequence plus the prompt tokens that
`step_plan` grants, so a running stream never waits for more than one ubatch of someone's
prompt. ctypes releases the GIL inside llama.cpp calls, so the asyncio thread stays
responsive. Sequences join and leave between steps; leaving frees their KV cache. Results
go back through an `Outbox` (see `engine_jobs`).

Exactness: a token's logits do not depend on which other sequences share its batch, nor
on how its prompt was cut into chunks (see `llama_context`). So batching changes no
output, a preempted sequence resumes by re-prefilling exactly where it was, and a seed
gives the same text either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .base import BackendError, BackendStats, Finish, FinishReason
from .engine_jobs import EngineCounters, Outbox, SequenceJob
from .llama_context import LlamaContext
from .llama_model import LlamaModel
from .sampler import SequenceSampler
from .step_plan import SequenceState, StepLimits, plan_step

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Active:
    job: SequenceJob
    seq_id: int
    sampler: SequenceSampler
    n_cached: int = 0  # tokens in this sequence's KV cache, i.e. the next position
    next_token: int | None = None  # sampled, to be decoded next step
    n_sampled: int = 0  # tokens sampled by this run (after `job.history`)

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.job.tokens)

    def state(self) -> SequenceState:
        remaining = len(self.job.tokens) - self.n_cached
        return SequenceState(self.job.priority, self.job.background, remaining)


@dataclass(eq=False)
class _Part:
    """One sequence's share of a batch (a `BatchPart`)."""

    active: _Active
    start: int
    tokens: Sequence[int]
    sample: bool  # the logits of its last token are wanted
    is_prefill: bool
    logits_index: int = -1

    @property
    def seq_id(self) -> int:
        return self.active.seq_id


class LlamaEngine:
    """Owns the llama.cpp context and the thread that drives it."""

    def __init__(
        self,
        model: LlamaModel,
        slots: int,
        context_per_slot: int,
        prefill_chunk: int,
        n_threads: int | None = None,
        background_prefill_chunk: int = 16,
        nice: int = 5,
    ) -> None:
        self.nice = nice
        self.model = model
        self.slots = slots
        self.context_per_slot = context_per_slot
        self.limits = StepLimits(prefill_chunk, background_prefill_chunk)
        self.n_threads = n_threads or os.cpu_count() or 1
        self._inbox: queue.SimpleQueue[tuple[str, SequenceJob | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._counters = EngineCounters()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._context: LlamaContext | None = None
        self._active: dict[SequenceJob, _Active] = {}
        self._waiting: deque[SequenceJob] = deque()
        self._by_seq_id: list[_Active | None] = []  # index == seq_id; None: a free id
        self._stream_moves = 0
        self._outbox = Outbox()

    # -- called from other threads -------------------------------------------------------

    def start(self) -> None:
        """Create the context (its KV cache holds `slots` sequences) and start the loop."""
        batch_size = self.limits.prefill_chunk + self.slots
        self._context = LlamaContext(
            self.model, self.slots, self.context_per_slot, batch_size, self.n_threads
        )
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    def submit(self, job: SequenceJob) -> None:
        with self._lock:
            if not self._accepting:
                raise BackendError("shutting down")
            self._inbox.put(("add", job))

    def cancel(self, job: SequenceJob) -> None:
        """Preemption: drop the sequence at the next step and free its KV cache."""
        self._inbox.put(("cancel", job))

    def stop(self) -> None:
        """Fail what is pending with 'shutting down', then end the thread; waits for it."""
        with self._lock:
            self._accepting = False
            self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def alive(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def stats(self) -> BackendStats:
        waiting, moves = len(self._waiting), self._stream_moves
        extra = {"waiting_sequences": float(waiting), "kv_stream_moves": float(moves)}
        return self._counters.snapshot(extra)

    # -- the engine thread: commands, slots ------------------------------------------------

    def _run(self) -> None:
        # Linux nice values are per thread and inherited by the compute threads ggml
        # starts from here: the engine yields the CPU to the event loop when both want it.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        try:
            while self._take_commands(block=not self._active):
                if self._active:
                    self._guarded_step()
                self._outbox.flush()
        finally:
            self._shut_down()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            command = self._inbox.get(block=block)
            while True:
                kind, job = command
                if kind == "stop":
                    return False
                assert job is not None
                if kind == "add":
                    self._waiting.append(job)
                    self._fill_slots()
                else:
                    self._drop(job)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _fill_slots(self) -> None:
        while self._waiting and len(self._active) < self.slots:
            self._activate(self._waiting.popleft())

    def _activate(self, job: SequenceJob) -> None:
        try:
            sampler = SequenceSampler(job.sampling, self.model, job.seed, job.prompt, job.history)
        except Exception:
            logger.exception("sampler setup failed for request %s", job.request_id)
            self._outbox.emit(job, BackendError("sampler setup failed"))
            return
        if None not in self._by_seq_id:
            self._by_seq_id.append(None)
        active = _Active(job, self._by_seq_id.index(None), sampler)
        self._by_seq_id[active.seq_id] = active
        self._active[job] = active
        self._counters.set_active(len(self._active))

    def _drop(self, job: SequenceJob) -> None:
        """Remove a sequence wherever it is; free its slot and KV cache."""
        if job in self._waiting:
            self._waiting.remove(job)
        active = self._active.pop(job, None)
        if active is None:
            return
        assert self._context is not None
        self._context.forget(active.seq_id)
        active.sampler.free()
        self._by_seq_id[active.seq_id] = None
        self._counters.set_active(len(self._active))
        self._fill_slots()  # a newcomer takes the freed id: nothing to move

    def _compact_seq_ids(self) -> None:
        """Make the seq ids in use 0..n-1 by moving the highest sequences into free ids.

        With one KV stream per sequence, llama.cpp puts only consecutive seq ids in one
        ubatch: a gap would split every later step into two passes over the weights. One
        copy of a moved sequence's stream (done inside the next llama_decode) is cheaper.
        """
        assert self._context is not None
        while self._by_seq_id and self._by_seq_id[-1] is None:
            self._by_seq_id.pop()
        while None in self._by_seq_id:
            hole = self._by_seq_id.index(None)
            last = self._by_seq_id.pop()
            assert last is not None
            self._context.move(last.seq_id, hole)
            last.seq_id = hole
            self._by_seq_id[hole] = last
            self._stream_moves += 1
            while self._by_seq_id[-1] is None:
                self._by_seq_id.pop()

    def _finish(self, job: SequenceJob, event: Finish | BackendError) -> None:
        self._outbox.emit(job, event)
        self._drop(job)

    # -- the engine thread: one step -------------------------------------------------------

    def _guarded_step(self) -> None:
        try:
            self._compact_seq_ids()
            self._decode_and_sample(self._plan_batch())
        except Exception:
            # A bug must not kill the thread: fail the sequences in flight, keep serving.
            logger.exception("engine step failed; failing %d sequences", len(self._active))
            for job in list(self._active):
                self._finish(job, BackendError("engine step failed"))

    def _plan_batch(self) -> list[_Part]:
        """The step's parts in seq id order: llama.cpp groups consecutive sequences."""
        active = [a for a in self._by_seq_id if a is not None]
        parts: list[_Part] = []
        plan = plan_step([a.state() for a in active], self.limits)
        for seq, n in zip(active, plan, strict=True):
            if not seq.prefilling:
                assert seq.next_token is not None
                parts.append(_Part(seq, seq.n_cached, (seq.next_token,), True, False))
            elif n > 0:
                end = seq.n_cached + n
                last = end == len(seq.job.tokens)
                chunk = seq.job.tokens[seq.n_cached : end]
                parts.append(_Part(seq, seq.n_cached, chunk, last, True))
        return parts

    def _decode_and_sample(self, parts: list[_Part]) -> None:
        """Decode `parts` in one call; on failure, isolate the sequence that caused it."""
        assert self._context is not None
        status = self._context.decode(parts)
        if status == 0:
            self._record_decoded(parts)
            for part in parts:
                if part.sample:
                    self._take_token(part)
            return
        for part in parts:  # undo whatever part of the batch reached the cache
            self._context.forget(part.seq_id, part.start)
        if len(parts) > 1:
            for part in parts:
                self._decode_and_sample([part])
            return
        job = parts[0].active.job
        logger.error("llama_decode returned %d for request %s", status, job.request_id)
        self._finish(job, BackendError(f"llama_decode failed ({status})"))

    def _record_decoded(self, parts: list[_Part]) -> None:
        for part in parts:
            part.active.n_cached += len(part.tokens)
        self._counters.prefilled(sum(len(part.tokens) for part in parts if part.is_prefill))

    def _take_token(self, part: _Part) -> None:
        active = part.active
        job = active.job
        assert self._context is not None
        position = len(job.history) + active.n_sampled
        token = active.sampler.sample(self._context.handle, part.logits_index, position)
        active.n_sampled += 1
        self._counters.sampled()
        if self.model.is_end_of_generation(token) and not job.sampling.ignore_eos:
            self._finish(job, Finish("stop"))
            return
        self._outbox.emit(job, token)
        reason = self._length_reached(active)
        if reason is not None:
            self._finish(job, Finish(reason))
        else:
            active.next_token = token

    def _length_reached(self, active: _Active) -> FinishReason | None:
        produced = len(active.job.history) + active.n_sampled
        in_context = len(active.job.tokens) + active.n_sampled
        if produced >= active.job.sampling.max_tokens or in_context >= self.context_per_slot:
            return "length"
        return None

    def _shut_down(self) -> None:
        for job in self._waiting:
            self._outbox.emit(job, BackendError("shutting down"))
        self._waiting.clear()
        for job in list(self._active):
            self._finish(job, BackendError("shutting down"))
        self._outbox.flush()
        if self._context is not None:
            self._context.free()
            self._context = None
