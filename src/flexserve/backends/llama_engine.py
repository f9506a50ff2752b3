"""The llama.cpp engine loop behind the embedded backend: continuous batching on one thread.

One thread owns the llama.cpp context. Each step it decodes every active sequence with
ONE `llama_decode`: one token per generating sequence plus at most `prefill_chunk` prompt
tokens, so a running stream never waits for more than one chunk of someone's prompt.
ctypes releases the GIL inside llama.cpp calls, so the asyncio thread stays responsive.
Sequences join and leave between steps; leaving frees their KV cache.

Results go back to each sequence's asyncio queue with one `call_soon_threadsafe` per
step and event loop.

Exactness: a token's logits do not depend on which other sequences share its batch, nor
on how its prompt was cut into chunks (one KV stream per sequence, ubatches below the
tiled-attention threshold). So batching changes no output, a preempted sequence resumes
by re-prefilling exactly where it was, and a seed gives the same text either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from .base import BackendError, BackendStats, Finish, FinishReason, SamplingParams

logger = logging.getLogger(__name__)

# What the engine sends to a sequence's queue: a sampled token id, the end, or a failure.
EngineEvent = int | Finish | BackendError

_MASK64 = (1 << 64) - 1
# ggml's CPU flash attention switches to a tiled kernel, with another summation order, once
# one sequence has 64 query rows in a ubatch. Below that, a token's logits and KV entries
# do not depend on how tokens were grouped, so batching and re-prefill on resume are
# exact. Prefill speed is the same with ubatches of 32..256 tokens on this model.
_EXACT_UBATCH = 63
_backend_ready = False
_backend_lock = threading.Lock()


def _forward_llama_log(level: int, text: bytes | None, user_data: int | None) -> None:
    # llama.cpp's info and debug output can echo token text: keep its warnings (3) and
    # errors (4) only (ggml_log_level).
    if level in (3, 4) and text:
        severity = logging.WARNING if level == 3 else logging.ERROR
        logger.log(severity, "llama.cpp: %s", text.decode(errors="replace").rstrip())


# ctypes must keep the callback object alive for as long as llama.cpp may call it.
_LLAMA_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
    _forward_llama_log
)


def init_llama_backend() -> None:
    """Initialise llama.cpp once per process and route its log away from stderr."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for drawing output token `position` (splitmix64 finaliser).

    Depending only on (seed, position) makes a seeded request give the same text whether
    or not it was preempted and resumed.
    """
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    # 0xFFFFFFFF is LLAMA_DEFAULT_SEED, which llama.cpp replaces by a random seed.
    return min(z & 0xFFFFFFFF, 0xFFFFFFFE)


class LlamaModel:
    """Weights and vocabulary, loaded once. Tokenizing is read-only, safe from any thread."""

    def __init__(self, path: str) -> None:
        init_llama_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.handle: Any = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.handle:
            raise BackendError(f"llama.cpp could not load {path}")
        self.vocab: Any = llama_cpp.llama_model_get_vocab(self.handle)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, no BOS added (the template adds it). `parse_special`
        turns texts like `<|im_end|>` into control tokens: for template text only."""
        data = text.encode()
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, capacity, False, parse_special
        )
        if n < 0:
            raise BackendError("tokenization failed")
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if n < 0:  # longer than 64 bytes: ask again with the size llama.cpp needs
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
            cached = self._pieces[token] = buffer.raw[: max(n, 0)]
        return cached

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode(errors="replace")

    def special_tokens(self) -> tuple[str, str]:
        """(BOS text, EOS text), as chat templates expect them."""
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        return self.token_text(bos), self.token_text(eos)

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.handle, None)
        return bytes(template).decode() if template else None

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def free(self) -> None:
        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None


class SequenceSampler:
    """llama.cpp's native sampler chain for one sequence (never Python over the logits)."""

    def __init__(
        self, sampling: SamplingParams, n_vocab: int, seed: int, history: Sequence[int]
    ) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain: Any = llama_cpp.llama_sampler_chain_init(params)
        self._seed = seed
        self._stochastic = sampling.temperature > 0
        if sampling.frequency_penalty or sampling.presence_penalty:
            # OpenAI penalises every token generated so far: the window is the whole output.
            window = max(sampling.max_tokens, 1)
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, window, 1.0, sampling.frequency_penalty, sampling.presence_penalty
                )
            )
        if self._stochastic:
            self._add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            if sampling.top_p < 1.0:
                self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            self._add(llama_cpp.llama_sampler_init_dist(position_seed(seed, len(history))))
        else:
            self._add(llama_cpp.llama_sampler_init_greedy())
        for token in history:  # resumed output counts for the penalties
            llama_cpp.llama_sampler_accept(self._chain, token)

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: Any, batch_index: int, position: int) -> int:
        """Draw output token number `position` from the logits at `batch_index`."""
        if self._stochastic:
            last = int(llama_cpp.llama_sampler_chain_n(self._chain)) - 1
            llama_cpp.llama_sampler_free(llama_cpp.llama_sampler_chain_remove(self._chain, last))
            self._add(llama_cpp.llama_sampler_init_dist(position_seed(self._seed, position)))
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def free(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


@dataclass(eq=False)
class SequenceJob:
    """One generation handed to the engine: prefill `tokens`, then sample."""

    request_id: str
    tokens: tuple[int, ...]  # prompt + output already produced before a preemption
    history: tuple[int, ...]  # that output alone (fed to the sampler's penalties)
    sampling: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent]
    priority: int = 0  # higher tiers get the prefill budget first
    background: bool = False  # flex/batch: prefilled in small steps (see _prefill_shares)


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


@dataclass(eq=False)
class _Part:
    """One sequence's share of a batch."""

    active: _Active
    start: int
    tokens: Sequence[int]
    sample: bool  # the logits of its last token are wanted
    is_prefill: bool
    logits_index: int = -1


@dataclass
class _Counters:
    busy_slot_seconds: float = 0.0
    prefilled_tokens: int = 0
    sampled_tokens: int = 0
    active_sequences: int = 0
    since: float = field(default_factory=time.monotonic)


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
        self.prefill_chunk = prefill_chunk
        self.background_prefill_chunk = background_prefill_chunk
        self.n_threads = n_threads or os.cpu_count() or 1
        self._inbox: queue.SimpleQueue[tuple[str, SequenceJob | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._active: dict[SequenceJob, _Active] = {}
        self._waiting: deque[SequenceJob] = deque()
        self._by_seq_id: list[_Active | None] = []  # index == seq_id; None: a free id
        self._stream_moves = 0
        self._outbox: list[tuple[SequenceJob, EngineEvent]] = []

    # -- called from other threads -------------------------------------------------------

    def start(self) -> None:
        """Create the context (its KV cache holds `slots` sequences) and start the loop."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slots * self.context_per_slot
        params.n_seq_max = self.slots
        params.n_batch = self.prefill_chunk + self.slots
        params.n_ubatch = _EXACT_UBATCH
        params.n_threads = params.n_threads_batch = self.n_threads
        # One KV stream per sequence (kv_unified off): batched decoding then gives
        # bit-identical logits to decoding each sequence alone, which exact resume and
        # reproducible seeds rely on. `_compact_seq_ids` pays the price.
        params.kv_unified = False
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not self._ctx:
            raise BackendError("llama.cpp could not create a context")
        assert int(llama_cpp.llama_n_ctx_seq(self._ctx)) >= self.context_per_slot
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.prefill_chunk + self.slots, 0, 1)
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
        with self._lock:
            c = self._counters
            busy = c.busy_slot_seconds + c.active_sequences * (time.monotonic() - c.since)
            return BackendStats(
                busy_slot_seconds=busy,
                prefilled_tokens=c.prefilled_tokens,
                sampled_tokens=c.sampled_tokens,
                active_sequences=c.active_sequences,
                extra={
                    "waiting_sequences": float(len(self._waiting)),
                    "kv_stream_moves": float(self._stream_moves),
                },
            )

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        # Linux nice values are per thread and inherited by the compute threads ggml
        # starts from here: the engine yields the CPU to the event loop when both want it.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        try:
            while self._take_commands(block=not self._active):
                if self._active:
                    self._guarded_step()
                self._flush_events()
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
                    self._admit(job)
                else:
                    self._drop(job)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, job: SequenceJob) -> None:
        self._waiting.append(job)
        self._fill_slots()

    def _fill_slots(self) -> None:
        while self._waiting and len(self._active) < self.slots:
            self._activate(self._waiting.popleft())

    def _activate(self, job: SequenceJob) -> None:
        try:
            sampler = SequenceSampler(job.sampling, self.model.n_vocab, job.seed, job.history)
        except Exception:
            logger.exception("sampler setup failed for request %s", job.request_id)
            self._emit(job, BackendError("sampler setup failed"))
            return
        if None not in self._by_seq_id:
            self._by_seq_id.append(None)
        active = _Active(job, self._by_seq_id.index(None), sampler)
        self._by_seq_id[active.seq_id] = active
        self._active[job] = active
        self._count_active()

    def _drop(self, job: SequenceJob) -> None:
        """Remove a sequence wherever it is; free its slot and KV cache."""
        if job in self._waiting:
            self._waiting.remove(job)
        active = self._active.pop(job, None)
        if active is None:
            return
        llama_cpp.llama_memory_seq_rm(self._memory, active.seq_id, -1, -1)
        active.sampler.free()
        self._by_seq_id[active.seq_id] = None
        self._count_active()
        self._fill_slots()  # a newcomer takes the freed id: nothing to move

    def _compact_seq_ids(self) -> None:
        """Make the seq ids in use 0..n-1 by moving the highest sequences into free ids.

        With one KV stream per sequence, llama.cpp puts only consecutive seq ids in one
        ubatch: a gap would split every later step into two passes over the weights. One
        copy of a moved sequence's stream (done inside the next llama_decode) is cheaper.
        """
        while self._by_seq_id and self._by_seq_id[-1] is None:
            self._by_seq_id.pop()
        while None in self._by_seq_id:
            hole = self._by_seq_id.index(None)
            last = self._by_seq_id.pop()
            assert last is not None
            llama_cpp.llama_memory_seq_cp(self._memory, last.seq_id, hole, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._memory, last.seq_id, -1, -1)
            last.seq_id = hole
            self._by_seq_id[hole] = last
            self._stream_moves += 1
            while self._by_seq_id[-1] is None:
                self._by_seq_id.pop()

    def _finish(self, job: SequenceJob, event: Finish | BackendError) -> None:
        self._emit(job, event)
        self._drop(job)

    def _guarded_step(self) -> None:
        try:
            self._step()
        except Exception:
            # A bug must not kill the thread: fail the sequences in flight, keep serving.
            logger.exception("engine step failed; failing %d sequences", len(self._active))
            for job in list(self._active):
                self._finish(job, BackendError("engine step failed"))

    def _step(self) -> None:
        self._compact_seq_ids()
        self._decode_and_sample(self._plan_batch())

    def _plan_batch(self) -> list[_Part]:
        """A token for every generating sequence, and prompt chunks up to the budget.

        In seq id order: llama.cpp groups consecutive sequences into one ubatch.
        """
        parts: list[_Part] = []
        shares = self._prefill_shares()
        for active in self._by_seq_id:
            if active is None:
                continue
            if not active.prefilling:
                assert active.next_token is not None
                parts.append(_Part(active, active.n_cached, (active.next_token,), True, False))
            elif active in shares:
                end = active.n_cached + shares[active]
                chunk = active.job.tokens[active.n_cached : end]
                last = end == len(active.job.tokens)
                parts.append(_Part(active, active.n_cached, chunk, last, True))
        return parts

    def _prefill_shares(self) -> dict[_Active, int]:
        """The step's prefill budget, higher priority first (then seq id order).

        Every step costs every sequence in it, so while a higher-priority sequence is
        active a lower one prefills nothing beside its prompt and at most one ubatch
        beside its decoding: an interactive stream never waits on a flex re-prefill.
        """
        active = [a for a in self._by_seq_id if a is not None]
        waiting = sorted(
            (a for a in active if a.prefilling), key=lambda a: (-a.job.priority, a.seq_id)
        )
        top = max((a.job.priority for a in active), default=0)
        shares: dict[_Active, int] = {}
        # One ubatch per step: a step is then one pass over the weights, so no stream
        # (and no newly arrived interactive prompt) waits behind a multi-pass prefill.
        decoding = len(active) - len(waiting)
        budget = min(self.prefill_chunk, max(1, _EXACT_UBATCH - decoding))
        for seq in waiting:
            if seq.job.priority < top:
                budget = 0 if shares else min(budget, _EXACT_UBATCH)
            if budget <= 0:
                break
            shares[seq] = min(budget, len(seq.job.tokens) - seq.n_cached)
            if seq.job.background:
                # A step costs whoever waits for it: an interactive prompt arriving now
                # waits for this step to end, so background prefill keeps steps short.
                shares[seq] = min(shares[seq], self.background_prefill_chunk)
            budget -= shares[seq]
        return shares

    def _decode_and_sample(self, parts: list[_Part]) -> None:
        """Decode `parts` in one call; on failure, isolate the sequence that caused it."""
        self._fill_batch(parts)
        status = int(llama_cpp.llama_decode(self._ctx, self._batch))
        if status == 0:
            self._record_decoded(parts)
            for part in parts:
                if part.sample:
                    self._take_token(part)
            return
        for part in parts:  # undo whatever part of the batch reached the cache
            llama_cpp.llama_memory_seq_rm(self._memory, part.active.seq_id, part.start, -1)
        if len(parts) > 1:
            for part in parts:
                self._decode_and_sample([part])
            return
        job = parts[0].active.job
        logger.error("llama_decode returned %d for request %s", status, job.request_id)
        self._finish(job, BackendError(f"llama_decode failed ({status})"))

    def _fill_batch(self, parts: list[_Part]) -> None:
        batch = self._batch
        tokens, positions, n_seq_ids = batch.token, batch.pos, batch.n_seq_id
        seq_ids, wants_logits = batch.seq_id, batch.logits
        i = 0
        for part in parts:
            seq_id = part.active.seq_id
            for offset, token in enumerate(part.tokens):
                tokens[i] = token
                positions[i] = part.start + offset
                n_seq_ids[i] = 1
                seq_ids[i][0] = seq_id
                wants_logits[i] = 0
                i += 1
            if part.sample:
                wants_logits[i - 1] = 1
                part.logits_index = i - 1
        batch.n_tokens = i

    def _record_decoded(self, parts: list[_Part]) -> None:
        for part in parts:
            part.active.n_cached += len(part.tokens)
        prefilled = sum(len(part.tokens) for part in parts if part.is_prefill)
        with self._lock:
            self._counters.prefilled_tokens += prefilled

    def _take_token(self, part: _Part) -> None:
        active = part.active
        job = active.job
        position = len(job.history) + active.n_sampled
        token = active.sampler.sample(self._ctx, part.logits_index, position)
        active.n_sampled += 1
        with self._lock:
            self._counters.sampled_tokens += 1
        if self.model.is_end_of_generation(token):
            self._finish(job, Finish("stop"))
            return
        self._emit(job, token)
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

    def _count_active(self) -> None:
        now = time.monotonic()
        with self._lock:
            c = self._counters
            c.busy_slot_seconds += c.active_sequences * (now - c.since)
            c.since = now
            c.active_sequences = len(self._active)

    def _emit(self, job: SequenceJob, event: EngineEvent) -> None:
        self._outbox.append((job, event))

    def _flush_events(self) -> None:
        """One wake-up per event loop per step, however many sequences it serves."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceJob, EngineEvent]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)

    def _shut_down(self) -> None:
        for job in self._waiting:
            self._emit(job, BackendError("shutting down"))
        self._waiting.clear()
        for job in list(self._active):
            self._finish(job, BackendError("shutting down"))
        self._flush_events()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._batch = self._ctx = self._memory = None


def _deliver(items: list[tuple[SequenceJob, EngineEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
