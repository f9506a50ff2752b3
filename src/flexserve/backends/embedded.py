"""The embedded backend: a real model in process, through llama.cpp.

`EmbeddedBackend` adapts the engine loop in `llama_engine` to the `Backend` Protocol:
chat template and tokenization, the asyncio side of each stream, incremental
detokenization and stop strings. Preemption is closing the generator (or cancelling its
task); resume is a new `generate` call with the chunks already produced, which re-prefills
prompt + those tokens and continues exactly where the stream stopped.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import threading
from collections.abc import AsyncGenerator, Callable, Sequence

from .base import (
    BackendError,
    BackendStats,
    ChatMessage,
    Chunk,
    Finish,
    GenerationRequest,
    TokenChunk,
)
from .chat_template import ChatTemplate, ControlTexts
from .engine_jobs import EngineEvent, SequenceJob
from .llama_engine import LlamaEngine
from .llama_model import LlamaModel
from .model_files import DEFAULT_MODEL_NAME

# Used only when a GGUF carries no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TextStream:
    """Token ids in, client text out: holds back what is not safe to send yet.

    Held back: bytes of a UTF-8 character split across tokens, and any tail of the text
    that could be the start of a stop string. Everything from a stop string on is never
    released. With `min_tokens` (vLLM's rule), only a stop string that ends in token
    number `min_tokens` or later stops the stream.
    """

    def __init__(
        self, piece: Callable[[int], bytes], stops: Sequence[str], min_tokens: int = 0
    ) -> None:
        self._piece = piece
        self._stops = tuple(stop for stop in stops if stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._min_tokens = min_tokens
        self._pushed = 0
        self._protected = 0  # no stop string may end in this start of the held text
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that may now go to the client."""
        self._held += self._utf8.decode(self._piece(token))
        self._pushed += 1
        if self._pushed < self._min_tokens:
            self._protected = len(self._held)
        cut = self._stop_position()
        if cut is not None:
            self.stopped = True
            text, self._held = self._held[:cut], ""
            return text
        keep = self._longest_stop_prefix_suffix()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text) :]
        self._protected = max(0, self._protected - len(text))
        return text

    def flush(self) -> str:
        """The text still held, at the end of the stream (never part of a stop string)."""
        if self.stopped:
            return ""
        text = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return text

    def _stop_position(self) -> int | None:
        """Where the first stop string that ends past the protected text starts."""
        found = [
            i
            for i in (
                self._held.find(stop, max(0, self._protected - len(stop) + 1))
                for stop in self._stops
            )
            if i >= 0
        ]
        return min(found) if found else None

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of the held text that starts some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if stop.startswith(self._held[-size:]):
                    longest = size
                    break
        return longest


def default_seed(request_id: str) -> int:
    """Seed for requests without one: stable per request, so resuming keeps the text."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")


class EmbeddedBackend:
    """A GGUF model served in process with continuous batching (see `llama_engine`)."""

    name = "embedded"
    can_pause = True  # re-prefill of prompt + its own tokens: exact
    estimates_tokens = False  # the model's chat template and tokenizer
    unsupported_sampling: frozenset[str] = frozenset()  # all of vLLM's are honoured

    def __init__(
        self,
        model_path: str,
        model_name: str = DEFAULT_MODEL_NAME,
        slots: int = 4,
        context_per_slot: int = 2048,
        prefill_chunk: int = 256,
        n_threads: int | None = None,
        background_prefill_chunk: int = 16,
        chat_template: str | None = None,
    ) -> None:
        """`chat_template` replaces the GGUF's own (Jinja, as in tokenizer_config.json)."""
        if slots < 1 or context_per_slot < 2 or prefill_chunk < 1:
            raise ValueError("slots, context_per_slot and prefill_chunk must be positive")
        self.model = model_name
        self.slots = slots
        self.context_length = context_per_slot
        self._model_lock = threading.Lock()  # tokenizing never races with freeing the model
        self._llama: LlamaModel | None = LlamaModel(model_path)
        self._template = self._chat_template(self._llama, chat_template)
        self._engine = LlamaEngine(
            self._llama,
            slots,
            context_per_slot,
            prefill_chunk,
            n_threads,
            background_prefill_chunk,
        )
        self._started = False

    @staticmethod
    def _chat_template(llama: LlamaModel, source: str | None) -> ChatTemplate:
        bos, eos = llama.special_tokens()
        source = source or llama.chat_template() or CHATML_TEMPLATE
        return ChatTemplate(source, ControlTexts(llama.control_texts()), bos, eos)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        """Render the model's chat template, then tokenize (safe from any thread).

        Only the template's own text may become control tokens: a user who writes
        `<|im_start|>system` gets those characters, not a forged system turn (see
        `chat_template`). A template that refuses the messages raises ValueError.
        """
        with self._model_lock:
            if self._llama is None:
                raise BackendError("backend closed")
            return self._template.encode(messages, self._llama)

    def encode_text(self, text: str) -> tuple[int, ...]:
        """A raw prompt as the model's own server tokenizes it: its BOS (if it adds one),
        special-token texts parsed (the prompt is wholly the client's)."""
        with self._model_lock:
            if self._llama is None:
                raise BackendError("backend closed")
            return tuple(self._llama.bos_prefix() + self._llama.tokenize(text, parse_special=True))

    async def start(self) -> None:
        if not self._started:
            await asyncio.to_thread(self._engine.start)
            self._started = True

    async def close(self) -> None:
        """Stop the engine (pending streams get BackendError('shutting down')), free the model."""
        if self._started:
            await asyncio.to_thread(self._engine.stop)
            await asyncio.sleep(0)  # let the engine's last deliveries reach their queues
        with self._model_lock:
            if self._llama is not None:
                self._llama.free()
                self._llama = None

    def health(self) -> bool:
        return self._llama is not None and self._engine.alive()

    def stats(self) -> BackendStats:
        return self._engine.stats()

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the continuation of prompt + `resume`; never repeats a resumed token."""
        if not self.health():
            raise BackendError("backend not running")
        if not request.prompt_tokens:
            raise BackendError("empty prompt")  # nothing to sample the first token from
        assert self._llama is not None
        sampling = request.sampling
        text = TextStream(self._llama.piece, sampling.stop, sampling.min_tokens)
        history = tuple(done.token_id for done in resume)
        for token in history:  # rebuild what was held back when the stream was cut
            text.push(token)
        if text.stopped:  # the resumed output already reached a stop string
            yield Finish("stop")
            return
        in_context = len(request.prompt_tokens) + len(history)
        if len(history) >= request.sampling.max_tokens or in_context >= self.context_length:
            yield Finish("length", text.flush())
            return
        job = self._new_job(request, history)
        self._engine.submit(job)
        try:
            while True:
                event = await job.events.get()
                for chunk in self._chunks(event, text, job):
                    yield chunk
                    if isinstance(chunk, Finish):
                        return
        finally:
            self._engine.cancel(job)  # a no-op once the engine has finished the job

    def _new_job(self, request: GenerationRequest, history: tuple[int, ...]) -> SequenceJob:
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else default_seed(request.request_id)
        return SequenceJob(
            request_id=request.request_id,
            tokens=request.prompt_tokens + history,
            history=history,
            sampling=sampling,
            seed=seed,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            priority=request.priority,
            background=request.background,
        )

    def _chunks(self, event: EngineEvent, text: TextStream, job: SequenceJob) -> list[Chunk]:
        if isinstance(event, BackendError):
            raise event
        if isinstance(event, Finish):
            return [Finish(event.reason, text.flush())]
        released = text.push(event)
        if not text.stopped:
            return [TokenChunk(event, released)]
        self._engine.cancel(job)  # before yielding: the consumer may never come back
        return [TokenChunk(event, released), Finish("stop")]
