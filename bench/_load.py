"""Load generation for the benchmarks, in processes of its own.

A minimal HTTP/1.1 client on asyncio streams (no client library between the socket and
the clock), and two process entry points built on it:

- `prober_main`: open-loop default-tier requests (streaming), sent at the absolute
  times the orchestrator gives it, each measured for TTFT, TPOT and end-to-end latency;
- `flood_main`: a closed-loop flex flood, N workers each keeping one request in flight
  while the flood is on; a shed request (429) is retried after its Retry-After (capped);
- `deep_flood_main`: an open-loop flex flood that builds a deep backlog: a burst of
  `backlog` requests, then Poisson arrivals; switched off, it hangs up on every request
  still open (the server cancels their jobs), so the next window starts from nothing.

Both talk to the orchestrator through a command queue (read by a thread, handed to the
event loop) and two shared integers (`state`, `inflight`), and send their results back
on an output queue when told to stop. Times are `time.monotonic()`, which is the same
clock in every process on Linux, so the orchestrator can place them in its windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    model: str
    key: str


@dataclass
class Result:
    """One request as the client saw it."""

    tier: str
    label: str
    stream: bool
    t_send: float = 0.0
    status: int = 0  # 0 = no HTTP response at all
    code: str | None = None  # error.code of an error body or stream error event
    detail: str = ""
    retry_after: float | None = None
    t_head: float | None = None  # response headers read (a flex job's start, when streaming)
    t_first: float | None = None  # first non-empty content delta (streaming only)
    t_last: float | None = None  # last non-empty content delta (streaming only)
    t_end: float | None = None  # response fully read
    chunks: int = 0  # non-empty content deltas received (streaming)
    words: int = 0  # whitespace-separated words in the text received
    finish_reason: str | None = None
    done: bool = False  # streaming: `data: [DONE]` seen
    usage_prompt: int | None = None
    usage_completion: int | None = None
    paused: int = 0  # `: paused` SSE comments seen
    outcome: str = "error"  # ok | shed | error (set by classify)

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def e2e(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_send

    @property
    def tpot(self) -> float | None:
        if self.t_first is None or self.t_last is None or self.chunks < 2:
            return None
        return (self.t_last - self.t_first) / (self.chunks - 1)

    @property
    def delivered_tokens(self) -> int:
        """Output tokens the client received: usage when the answer is whole, else what
        arrived (streamed chunks; a cut non-streaming answer delivers nothing)."""
        if self.outcome == "ok" and self.usage_completion is not None:
            return self.usage_completion
        return self.chunks


def classify(res: Result, expected_tokens: int | None) -> None:
    """ok = 200 and a whole answer; shed = 429 resource_unavailable; else error."""
    if res.status == 429 and res.code == "resource_unavailable":
        res.outcome = "shed"
        return
    whole = (
        res.status == 200
        and res.code is None
        and res.finish_reason in ("stop", "length")
        and res.usage_completion is not None
        and (res.done or not res.stream)
    )
    if whole and expected_tokens is not None:
        # The simulated backend: every token is one word, and the length is known.
        whole = res.usage_completion == expected_tokens and res.words == expected_tokens
        if whole and res.stream:
            whole = res.chunks == expected_tokens
        if not whole:
            res.detail = (
                f"tokens usage={res.usage_completion} words={res.words} "
                f"chunks={res.chunks} expected={expected_tokens}"
            )
    res.outcome = "ok" if whole else "error"


# ---- the HTTP client ----------------------------------------------------------------


async def chat(
    target: Target,
    res: Result,
    payload: dict[str, Any],
    timeout: float,  # noqa: ASYNC109 (the whole request, connect to last byte)
    extra_headers: dict[str, str] | None = None,
) -> Result:
    """POST one chat completion on a fresh connection and fill `res` as it arrives."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    lines = [
        f"POST {CHAT_PATH} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        f"Authorization: Bearer {target.key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    res.t_send = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(request)
            await writer.drain()
            status, headers = await _read_head(reader)
            res.t_head = time.monotonic()
            res.status = status
            if "retry-after-ms" in headers:
                res.retry_after = float(headers["retry-after-ms"]) / 1000.0
            elif "retry-after" in headers:
                res.retry_after = float(headers["retry-after"])
            if headers.get("content-type", "").startswith("text/event-stream"):
                await _read_sse(reader, headers, res)
            else:
                raw = b"".join([part async for part in _body(reader, headers)])
                _read_json(raw, res)
            res.t_end = time.monotonic()
    except TimeoutError:
        res.detail = f"client timeout after {timeout:.0f} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        res.detail = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return res


async def get_json(target: Target, path: str, timeout: float) -> tuple[int, Any]:  # noqa: ASYNC109
    """GET one JSON document on a fresh connection: (status, parsed body)."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Authorization: Bearer {target.key}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(request)
            await writer.drain()
            status, headers = await _read_head(reader)
            raw = b"".join([part async for part in _body(reader, headers)])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return status, json.loads(raw) if raw else None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    status = int(first.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readline()  # the empty line after the last chunk (no trailers)
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def _read_sse(reader: asyncio.StreamReader, headers: dict[str, str], res: Result) -> None:
    buffer = b""
    async for part in _body(reader, headers):
        now = time.monotonic()
        buffer += part
        while (cut := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:cut], buffer[cut + 2 :]
            for line in event.split(b"\n"):
                _sse_line(line, now, res)


def _sse_line(line: bytes, now: float, res: Result) -> None:
    if line.startswith(b":"):
        if b"paused" in line:
            res.paused += 1
        return
    if not line.startswith(b"data:"):
        return
    data = line[5:].strip()
    if data == b"[DONE]":
        res.done = True
        return
    obj = json.loads(data)
    if "error" in obj:
        res.code = (obj["error"] or {}).get("code") or "stream_error"
        res.detail = str((obj["error"] or {}).get("message", ""))[:200]
        return
    for choice in obj.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            res.chunks += 1
            res.words += len(content.split())
            if res.t_first is None:
                res.t_first = now
            res.t_last = now
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
    _usage(obj, res)


def _read_json(raw: bytes, res: Result) -> None:
    obj = json.loads(raw) if raw else {}
    if res.status != 200:
        error = obj.get("error") or {}
        res.code = error.get("code") or error.get("type") or f"http_{res.status}"
        res.detail = str(error.get("message", ""))[:200]
        return
    choice = (obj.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    res.words = len(text.split())
    res.finish_reason = choice.get("finish_reason")
    _usage(obj, res)


def _usage(obj: dict[str, Any], res: Result) -> None:
    usage = obj.get("usage")
    if usage:
        res.usage_prompt = usage.get("prompt_tokens")
        res.usage_completion = usage.get("completion_tokens")


# ---- plumbing shared by the two processes ----------------------------------------------


@dataclass
class LoadConfig:
    target: Target
    max_tokens: int
    expected_tokens: int | None  # known output length (simulated backend), else None
    default_timeout: float = 60.0
    flex_timeout: float = 120.0
    flood_workers: int = 24
    stream_every: int = 2  # flood worker i streams when i % stream_every == 0
    impatient_fraction: float = 0.25
    impatient_wait: tuple[float, float] = (0.5, 4.0)
    shed_backoff_cap: float = 2.0
    seed: int = 1
    backlog: int = 0  # deep mode: flex requests sent in a burst when the flood starts
    burst_rps: float = 150.0  # how fast the burst is sent
    topup_rps: float = 0.0  # deep mode: open-loop Poisson flex rate after the burst


OFF, ON = 0, 1


def _command_pump(cmd_q: Any, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
    """Blocking reads of the multiprocessing queue, handed to the event loop."""
    while True:
        msg = cmd_q.get()
        loop.call_soon_threadsafe(inbox.put_nowait, msg)
        if msg[0] == "stop":
            return


def _start_pump(cmd_q: Any) -> asyncio.Queue[Any]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_command_pump, args=(cmd_q, loop, inbox), daemon=True).start()
    return inbox


def _prompt(kind: str, index: int) -> list[dict[str, str]]:
    text = (
        f"{kind} request {index}: please summarise how the idle slots of a small "
        "inference server keep working on cheap background tokens"
    )
    return [{"role": "user", "content": text}]


# ---- the default-tier prober ----------------------------------------------------------


def prober_main(cfg: LoadConfig, cmd_q: Any, out_q: Any, inflight: Any) -> None:
    """Commands: ("window", label, t0, offsets) sends one request at each t0 + offset;
    ("stop",) waits for everything scheduled, then puts the list of Results on out_q.
    `inflight` counts requests scheduled and not yet answered."""
    out_q.put(asyncio.run(_prober(cfg, cmd_q, inflight)))


async def _prober(cfg: LoadConfig, cmd_q: Any, inflight: Any) -> list[Result]:
    inbox = _start_pump(cmd_q)
    results: list[Result] = []
    tasks: set[asyncio.Task[None]] = set()
    counter = 0

    async def one(label: str, index: int) -> None:
        payload = {
            "model": cfg.target.model,
            "messages": _prompt("interactive", index),
            "service_tier": "default",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": cfg.max_tokens,
        }
        res = Result("default", label, stream=True)
        await chat(cfg.target, res, payload, cfg.default_timeout)
        classify(res, cfg.expected_tokens)
        results.append(res)
        inflight.value -= 1

    async def window(label: str, t0: float, offsets: list[float]) -> None:
        nonlocal counter
        for offset in offsets:
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            counter += 1
            task = asyncio.create_task(one(label, counter))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    while True:
        msg = await inbox.get()
        if msg[0] == "window":
            _, label, t0, offsets = msg
            inflight.value += len(offsets)
            task = asyncio.create_task(window(label, t0, offsets))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif msg[0] == "stop":
            while tasks:
                await asyncio.gather(*list(tasks))
            return results


# ---- the flex flood -------------------------------------------------------------------


def flood_main(cfg: LoadConfig, cmd_q: Any, out_q: Any, state: Any, inflight: Any) -> None:
    """Commands: ("on", label) starts (or relabels) the flood; ("off",) stops sending new
    requests (those in flight finish or are shed); ("stop",) ends it and puts the list
    of Results on out_q. `state` is ON/OFF once a command is applied; `inflight` counts
    requests sent and not yet answered."""
    out_q.put(asyncio.run(_flood(cfg, cmd_q, state, inflight)))


async def _flood(cfg: LoadConfig, cmd_q: Any, state: Any, inflight: Any) -> list[Result]:
    inbox = _start_pump(cmd_q)
    rng = random.Random(cfg.seed)
    results: list[Result] = []
    on, off = asyncio.Event(), asyncio.Event()
    off.set()
    label = ""
    stopping = False
    counter = 0

    async def worker(index: int) -> None:
        nonlocal counter
        stream = index % cfg.stream_every == 0
        while True:
            await on.wait()
            if stopping:
                return
            if not on.is_set():
                continue
            counter += 1
            headers = {}
            if rng.random() < cfg.impatient_fraction:
                headers["X-Flex-Max-Wait"] = f"{rng.uniform(*cfg.impatient_wait):.2f}"
            payload = _flex_payload(cfg, _prompt(f"background {index}", counter), stream)
            res = Result("flex", label, stream=stream)
            inflight.value += 1
            try:
                await chat(cfg.target, res, payload, cfg.flex_timeout, headers)
            finally:
                inflight.value -= 1
            classify(res, cfg.expected_tokens)
            results.append(res)
            if res.outcome == "shed":  # honour Retry-After, as a polite client would
                backoff = min(res.retry_after or 1.0, cfg.shed_backoff_cap)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(off.wait(), backoff)

    workers = [asyncio.create_task(worker(i)) for i in range(cfg.flood_workers)]
    while True:
        msg = await inbox.get()
        if msg[0] == "on":
            label = msg[1]
            off.clear()
            on.set()
            state.value = ON
        elif msg[0] == "off":
            on.clear()
            off.set()
            state.value = OFF
        elif msg[0] == "stop":
            stopping = True
            on.set()  # wake the workers so they return; none sends again
            off.set()
            await asyncio.gather(*workers)
            return results


# ---- the deep flex backlog ----------------------------------------------------------


def deep_flood_main(cfg: LoadConfig, cmd_q: Any, out_q: Any, state: Any, inflight: Any) -> None:
    """Commands as `flood_main`; ("off",) also closes every open request."""
    out_q.put(asyncio.run(_deep_flood(cfg, cmd_q, state, inflight)))


async def _deep_flood(cfg: LoadConfig, cmd_q: Any, state: Any, inflight: Any) -> list[Result]:
    inbox = _start_pump(cmd_q)
    rng = random.Random(cfg.seed)
    results: list[Result] = []
    open_requests: set[asyncio.Task[None]] = set()
    label = ""
    counter = 0

    async def one(index: int) -> None:
        stream = index % cfg.stream_every == 0
        payload = _flex_payload(cfg, _prompt("background", index), stream)
        res = Result("flex", label, stream=stream)
        inflight.value += 1
        try:
            await chat(cfg.target, res, payload, cfg.flex_timeout)
            classify(res, cfg.expected_tokens)
        except asyncio.CancelledError:
            res.outcome = "cancelled"  # hung up on purpose when the flood went off
            res.t_end = time.monotonic()
            raise
        finally:
            inflight.value -= 1
            results.append(res)

    def send() -> None:
        nonlocal counter
        counter += 1
        task = asyncio.create_task(one(counter))
        open_requests.add(task)
        task.add_done_callback(open_requests.discard)

    async def sender() -> None:
        for _ in range(cfg.backlog):
            send()
            await asyncio.sleep(1.0 / cfg.burst_rps)
        state.value = ON  # the backlog is built: the orchestrator may start a window
        while cfg.topup_rps > 0:
            await asyncio.sleep(rng.expovariate(cfg.topup_rps))
            send()

    sending: asyncio.Task[None] | None = None
    while True:
        msg = await inbox.get()
        if msg[0] == "on":
            label = msg[1]
            if sending is None:
                sending = asyncio.create_task(sender())
        elif msg[0] in ("off", "stop"):
            if sending is not None:
                sending.cancel()
                sending = None
            for task in list(open_requests):
                task.cancel()
            await asyncio.gather(*open_requests, return_exceptions=True)
            state.value = OFF
            if msg[0] == "stop":
                return results


def _flex_payload(cfg: Any, messages: list[dict[str, str]], stream: bool) -> dict[str, Any]:
    """A flex chat request as the flood sends it (usage in the last chunk when streaming)."""
    payload: dict[str, Any] = {
        "model": cfg.target.model,
        "messages": messages,
        "service_tier": "flex",
        "stream": stream,
        "max_tokens": cfg.max_tokens,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload
