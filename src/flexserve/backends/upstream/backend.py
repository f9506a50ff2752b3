"""The `openai` backend: one OpenAI-compatible upstream engine (vLLM, SGLang, llama.cpp's
server, OpenAI itself, another flexserve) behind the Backend protocol.

The upstream tokenizes for itself, so the prompt length used for admission is an estimate
(`estimate_prompt_tokens`); what is billed is what the engine reports in its usage. Each
streamed text delta is one token (vLLM, SGLang and llama.cpp send one token per chunk);
where the engine's usage counts more completion tokens than deltas, the difference is
emitted as empty tokens before the finish, so billing follows the engine's count.

Pausing closes the HTTP stream (the engine aborts the request); resuming sends the
partial answer in the backend's continuation style (`continuation.py`). Failures count
toward a circuit breaker; a stalled stream is a failure too (httpx's read timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from flexserve.backends.base import (
    BackendError,
    BackendStats,
    ChatMessage,
    Chunk,
    EngineRefused,
    Finish,
    GenerationRequest,
    NoBackendAvailable,
    TokenChunk,
)
from flexserve.backends.upstream.breaker import CircuitBreaker
from flexserve.backends.upstream.continuation import (
    TOKEN_STYLES,
    ContinuationStyle,
    RenderPrompt,
    SamplingDialect,
    UpstreamCall,
    build_call,
)
from flexserve.backends.upstream.engine_load import EngineLoad, parse_engine_load
from flexserve.backends.upstream.llamacpp_tokens import apply_template, build_token_call
from flexserve.backends.upstream.priority import PriorityStyle, priority_fields
from flexserve.backends.upstream.prompt_count import CountPrompt
from flexserve.backends.upstream.seam import Seam
from flexserve.backends.upstream.stream import (
    UPSTREAM_TOKEN,
    StreamEnd,
    TextDelta,
    stream_call,
    upstream_headers,
)
from flexserve.backends.upstream.vllm_tokens import all_named, build_vllm_token_call, tokenize
from flexserve.scheduling.tiers import TIERS, Tier

log = logging.getLogger("flexserve.upstream")

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
"""Role markers and separators a chat template adds per message, roughly."""
COUNTS_AT_ONCE = 4
"""Prompt counts a backend asks of its engine at once (`engine_prompt_tokens`)."""
START_PROBE_TIMEOUT = 5.0
"""Seconds the start-up probe waits for an answer before the backend starts out."""
READ_BUFFER = 1 << 20
"""aiohttp reads an SSE line of at most about twice this (its default is 64 KiB)."""


@dataclass(frozen=True)
class Capabilities:
    """What the upstream engine can do, declared in config (never guessed)."""

    priority: PriorityStyle = "none"
    continuation: ContinuationStyle = "none"
    service_tier_passthrough: bool = False
    batch_invariant: bool = False
    """The engine runs batch-invariant (vLLM's VLLM_BATCH_INVARIANT=1): prefilling the
    prompt and the produced ids gives what decoding them one by one gave."""
    dialect: SamplingDialect = "vllm"
    """The names its API gives the samplers beyond OpenAI's (`sampling_fields`)."""
    unsupported_sampling: frozenset[str] = frozenset()
    """vLLM's sampling extensions it cannot honour: a request asking for one is refused
    by name (400) instead of the engine silently dropping it."""

    @property
    def ends_streamed_connections(self) -> bool:
        """llama-server (both of its styles) closes its connection after each streamed
        answer without a `Connection: close`; a pooled connection reused at once fails
        the next call before the engine sees it."""
        return self.continuation in ("llamacpp", "llamacpp-tokens")

    def guarantee(self) -> str:
        """What a resumed answer promises on this backend, for /v1/models and the docs."""
        if self.continuation == "none":
            return "never paused mid-answer (the engine cannot continue a partial answer)"
        if self.continuation in TOKEN_STYLES:
            exact = (
                "a token-level resume is identical to the uninterrupted answer at "
                "temperature 0 (the engine is declared batch-invariant)"
                if self.batch_invariant
                else "identical to an uninterrupted answer only on a batch-invariant engine"
            )
            return (
                "token-level: resumes from the engine's own token ids (never re-tokenized "
                "text; text-level after tokens from a text-level member"
                + (", or with stop strings" if self.continuation == "vllm-tokens" else "")
                + f"); no duplicate, no gap, billed once; {exact}"
            )
        return "seamless: no duplicate, no gap, billed once; text may differ after a pause"


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    """Ends in /v1."""
    api_key: str | None
    upstream_model: str
    metrics_url: str | None = None
    """vLLM-style Prometheus metrics, for routing by the engine's own load."""


class OpenAIBackend:
    name = "openai"
    estimates_tokens = True  # the engine counts for itself; billing uses its count

    def __init__(
        self,
        label: str,
        model: str,
        endpoint: Endpoint,
        slots: int,
        capabilities: Capabilities,
        *,
        context_length: int = 131_072,
        render: RenderPrompt | None = None,
        stall_timeout: float = 120.0,
        connect_timeout: float = 5.0,
        metrics_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        breaker: CircuitBreaker | None = None,
        count_prompt: CountPrompt | None = None,
    ) -> None:
        self.label = label
        self.model = model
        self.endpoint = endpoint
        self.slots = slots
        self.capabilities = capabilities
        self.context_length = context_length
        self.can_pause = capabilities.continuation != "none"
        self.unsupported_sampling = capabilities.unsupported_sampling
        self.breaker = breaker or CircuitBreaker()
        self.in_flight = 0
        self.engine_load: EngineLoad | None = None
        self._render = render
        self._count_prompt = count_prompt
        """The engine's own count of a prompt, where its usage cannot give it: an engine
        whose streams carry none, and a stream cut before it came (`prompt_count.py`)."""
        self._counting: asyncio.Semaphore | None = None
        self._clock = clock
        self._metrics_interval = metrics_interval
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=stall_timeout)
        self._http: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stats = BackendStats()

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        return (UPSTREAM_TOKEN,) * estimate_prompt_tokens(messages)

    def encode_text(self, text: str) -> tuple[int, ...]:
        return (UPSTREAM_TOKEN,) * max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    async def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        # Built before the breaker hands out a probe: a call that cannot be built (no
        # continuation, a template that refuses) must not leave the probe taken.
        style = self._style_for(request, resume)
        seam = Seam(resume, echoes=style == "llamacpp")
        if len(seam.sent) >= request.sampling.max_tokens:  # paused before its finish
            yield Finish("length")
            return
        token_level = style in TOKEN_STYLES
        text_call = None if token_level else self._text_call(style, request, seam.sent)
        now = self._clock()
        if not self.breaker.allows(now):
            raise NoBackendAvailable(
                f"backend {self.label} is out (circuit open)",
                retry_in=max(0.5, self.breaker.remaining(now)),
            )
        self.in_flight += 1
        self._stats.active_sequences = self.in_flight
        answered = False
        try:
            call = text_call or await self._token_call(style, request, seam.sent)
            passed, plain = seam.passed, 0
            close = self.capabilities.ends_streamed_connections
            items = stream_call(self._client(), *self._where(), call, close=close)
            # aclosing: closing this generator (a pause) closes the upstream stream before
            # it returns, not when the garbage collector finalizes the inner one
            async with contextlib.aclosing(items):
                async for item in items:
                    if not answered:  # the engine took the request: it works
                        answered = True
                        self.breaker.succeeded()
                    if isinstance(item, TextDelta):
                        if passed and not item.token_ids:  # most tokens: as they come
                            plain += 1
                            yield TokenChunk(UPSTREAM_TOKEN, item.text)
                            continue
                        for chunk in seam.chunks(item):
                            yield chunk
                        passed = seam.passed
                    else:
                        seam.streamed += plain
                        plain = 0  # counted by `_end`
                        end = await self._counted(item, request, len(seam.sent))
                        for ending in self._end(end, seam):
                            yield ending
        except BackendError:
            self.breaker.failed(self._clock())
            raise
        except EngineRefused:
            self.breaker.succeeded()  # it answered: refusing is not failing
            raise
        finally:  # paused or abandoned before any verdict: let another request probe
            self.breaker.release_probe()
            self.in_flight -= 1
            self._stats.active_sequences = self.in_flight
            self._stats.busy_slot_seconds += self._clock() - now
            if not seam.ended:  # paused, cut or failed: what it streamed was sampled
                self._stats.sampled_tokens += seam.streamed + plain

    def _style_for(
        self, request: GenerationRequest, resume: Sequence[TokenChunk]
    ) -> ContinuationStyle:
        """This call's style. vLLM's token-level one resumes text-level (a) after tokens
        with no engine id (from a text-level member of the pool), and (b) with stop
        strings: vLLM then holds back characters, not whole tokens, so the ids of a
        token whose text was only partly released would lose the rest of it."""
        style = self.capabilities.continuation
        if style == "vllm-tokens" and (request.sampling.stop or not all_named(resume)):
            return "vllm"
        return style

    def _text_call(
        self, style: ContinuationStyle, request: GenerationRequest, resume: Sequence[TokenChunk]
    ) -> UpstreamCall:
        return build_call(
            style,
            model=self.endpoint.upstream_model,
            messages=request.messages,
            sampling=request.sampling,
            partial="".join(chunk.text for chunk in resume),
            produced=len(resume),
            extra=self._extra_fields(request.tier),
            render=self._render,
            prompt_text=request.prompt_text,
            dialect=self.capabilities.dialect,
        )

    async def _token_call(
        self, style: ContinuationStyle, request: GenerationRequest, resume: Sequence[TokenChunk]
    ) -> UpstreamCall:
        """The prompt as the engine itself renders and tokenizes the chat (asked for on
        each call, so that a resume on another server of the pool asks there), then the
        tokens produced."""
        model, http = self.endpoint.upstream_model, self._client()
        if style == "vllm-tokens":
            ids = await tokenize(http, *self._where(), model, request.messages, request.prompt_text)
            extra = self._extra_fields(request.tier)
            return build_vllm_token_call(model, ids, request.sampling, resume, extra)
        prompt = request.prompt_text
        if prompt is None:
            prompt = await apply_template(http, *self._where(), model, request.messages)
        return build_token_call(model, prompt, request.sampling, resume)

    async def engine_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Where the engine's usage cannot give it (`prompt_count.py`). Bounded: many
        streams cut at once (a shutdown) must not flood the engine serving the rest."""
        if self._count_prompt is None:
            return None
        if self._counting is None:
            self._counting = asyncio.Semaphore(COUNTS_AT_ONCE)
        async with self._counting:
            return await self._count_prompt(self._client(), request.messages, request.prompt_text)

    async def _counted(self, end: StreamEnd, request: GenerationRequest, resumed: int) -> StreamEnd:
        """`end` with the engine's prompt count, asked for if the stream carried none
        (as if reported by the call: a resume's prompt holds the partial answer too)."""
        if end.prompt_tokens is not None:
            return end
        counted = await self.engine_prompt_tokens(request)
        return end if counted is None else replace(end, prompt_tokens=counted + resumed)

    def _end(self, end: StreamEnd, seam: Seam) -> list[Chunk]:
        """The finish (with any text the seam still holds), after empty tokens for any
        the engine counted but did not stream."""
        emitted, resumed = seam.streamed, len(seam.sent)
        seam.ended = True
        self.breaker.succeeded()
        self._stats.sampled_tokens += max(emitted, end.completion_tokens or 0)
        unseen = max(0, (end.completion_tokens or 0) - emitted)
        prompt = None
        if end.prompt_tokens is not None:  # a resume's prompt holds the partial answer too
            prompt = max(1, end.prompt_tokens - resumed)
        padding: list[Chunk] = [TokenChunk(UPSTREAM_TOKEN, "")] * unseen
        return [*padding, Finish(end.finish_reason, text=seam.held, prompt_tokens=prompt)]

    def _extra_fields(self, tier: str) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if tier in TIERS:
            known: Tier = tier
            fields.update(priority_fields(self.capabilities.priority, known))
            if self.capabilities.service_tier_passthrough:
                fields["service_tier"] = known
        return fields

    def _where(self) -> tuple[str, str | None]:
        return self.endpoint.base_url, self.endpoint.api_key

    def _client(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that uses it (aiohttp's rule)."""
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=0)  # the scheduler bounds concurrency
            self._http = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                read_bufsize=READ_BUFFER,
                # One session serves every tenant: a cookie set on one tenant's answer
                # (a sticky load balancer's) must never go out with another's request.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._http

    def load(self, now: float) -> float:
        """Lower is less loaded: own in-flight share, plus the engine's queue where known
        (metrics gone stale count as saturated)."""
        own = self.in_flight / self.slots
        if self.endpoint.metrics_url is None:
            return own
        if self.engine_load is None:
            return math.inf
        return own + self.engine_load.score(now, stale_after=5 * self._metrics_interval)

    async def start(self) -> None:
        await self._probe_at_start()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_while_out(), name=f"watch-{self.label}")
        if self.endpoint.metrics_url is not None and self._poller is None:
            self._poller = asyncio.create_task(self._poll_metrics(), name=f"metrics-{self.label}")

    async def _probe_at_start(self) -> None:
        """An engine that nothing listens for (or that does not answer in time) is out
        from the start, not called healthy until three requests have failed."""
        if not await self._answers():
            self.breaker.trip(self._clock())

    async def _watch_while_out(self) -> None:
        """While its breaker is open, the engine is probed as its cooldown ends (not
        only when a request happens by), so that /healthz does not call a dead engine
        healthy between cooldowns."""
        while True:
            wait = self.breaker.remaining(self._clock()) if self.breaker.state == "open" else 1.0
            await asyncio.sleep(min(1.0, max(0.05, wait)))
            await self.reprobe()

    async def reprobe(self) -> None:
        """One probe of an open breaker whose cooldown is over. No answer: open again,
        with the cooldown doubled. An answer (any status) says only that the engine is
        there: the breaker is left ready for a request to be the real probe, as before."""
        if self.breaker.state != "open" or not self.breaker.allows(self._clock()):
            return
        if await self._answers():
            self.breaker.release_probe()
        else:
            self.breaker.failed(self._clock())

    async def _answers(self) -> bool:
        """Does the engine answer HTTP at all (its /models, within a few seconds)?"""
        url = self.endpoint.base_url.rstrip("/") + "/models"
        headers = upstream_headers(self.endpoint.api_key)
        timeout = aiohttp.ClientTimeout(total=START_PROBE_TIMEOUT)
        try:
            probe = self._client().get(url, timeout=timeout, headers=headers, allow_redirects=False)
            async with probe as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("backend %s does not answer: %s", self.label, type(error).__name__)
            return False
        return True

    async def _poll_metrics(self) -> None:
        assert self.endpoint.metrics_url is not None
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with self._client().get(self.endpoint.metrics_url) as response:
                    if response.status == 200:
                        text = await response.text()
                        self.engine_load = parse_engine_load(text, self._clock())
            await asyncio.sleep(self._metrics_interval)

    async def close(self) -> None:
        for task in (self._poller, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._http is not None:
            await self._http.close()

    def health(self) -> bool:
        return self.breaker.healthy(self._clock())

    def state(self) -> str:
        """closed / open / half_open, as /v1/models, /healthz and /metrics report it."""
        self.breaker.healthy(self._clock())
        return self.breaker.state

    def stats(self) -> BackendStats:
        return self._stats


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """About how many tokens the upstream will count (for admission and predictions only;
    billing uses the engine's own count)."""
    text = sum(len(m.content) for m in messages)
    return max(1, math.ceil(text / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages))
