"""Embedded engine throughput against llama.cpp itself, in one process and one run.

Measures output tokens/s of:
  - flexserve's engine (`EmbeddedBackend.generate`) at 1 and at 8 concurrent requests;
  - a minimal raw llama.cpp batched loop (8 sequences, greedy, one `llama_decode` per
    step, same library, model and context settings): the physical limit;
  - llama-cpp-python's own `Llama.create_chat_completion`, single stream, same threads
    and flash-attention setting.

Each figure is the median of several interleaved runs after a warm-up; prefill is inside
every timing. The last line printed is one JSON object for scripts.

    python bench/engine.py [--max-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp import Llama

from flexserve.backends.base import ChatMessage, GenerationRequest, SamplingParams, TokenChunk
from flexserve.backends.embedded import EmbeddedBackend
from flexserve.backends.llama_model import LlamaModel
from flexserve.backends.model_files import default_model_path

# Story prompts: SmolLM2 writes well past 64 tokens before its end-of-turn token.
PROMPTS = (
    "Write a very long story about a dragon who lives in a castle by the sea.",
    "Write a long story about a sailor lost in a storm.",
    "Write a long essay about the history of the printing press.",
    "Write a long story about a robot learning to paint.",
    "Write a long story about a village in the mountains during winter.",
    "Write a long essay about why people enjoy gardening.",
    "Write a long story about two friends crossing a desert.",
    "Write a long story about a library that never closes.",
)
CONTEXT_PER_SLOT = 1024
PREFILL_CHUNK = 256
SLOTS = 8


@dataclass(frozen=True)
class Setup:
    backend: EmbeddedBackend
    raw: RawBatchLoop
    llama: Llama
    prompts: list[tuple[int, ...]]
    max_tokens: int


async def engine_run(backend: EmbeddedBackend, prompts: Sequence[tuple[int, ...]], n: int) -> int:
    """Run one request per prompt concurrently; return the output tokens produced."""

    async def one(i: int, prompt: tuple[int, ...]) -> int:
        request = GenerationRequest(f"bench-{i}", prompt, SamplingParams(n, temperature=0.0))
        return sum([isinstance(c, TokenChunk) async for c in backend.generate(request)])

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


class RawBatchLoop:
    """A minimal batched greedy loop on the llama.cpp C API: the physical limit.

    Every sequence decodes `max_tokens` tokens (end-of-turn ignored), one llama_decode per
    step, sampled by llama.cpp's greedy sampler.
    """

    def __init__(self, model: LlamaModel, n_seq: int, n_threads: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * CONTEXT_PER_SLOT
        params.n_seq_max = n_seq
        params.n_batch = params.n_ubatch = PREFILL_CHUNK + SLOTS
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        self.n_batch = PREFILL_CHUNK + SLOTS
        self.ctx: Any = llama_cpp.llama_init_from_model(model.handle, params)
        self.batch: Any = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.greedy: Any = llama_cpp.llama_sampler_init_greedy()

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> int:
        """Output tokens produced (all sequences)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        sequences = range(len(prompts))
        self._prefill(prompts)
        positions = [len(p) for p in prompts]
        tokens = [self._sample(s) for s in sequences]
        for _ in range(max_tokens - 1):
            self._fill([(s, positions[s], tokens[s], True) for s in sequences])
            self._decode()
            positions = [p + 1 for p in positions]
            tokens = [self._sample(s) for s in sequences]
        return max_tokens * len(prompts)

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """All but each prompt's last token in batches of n_batch, then every last token
        in one batch, so that sequence s's logits are at batch index s."""
        body = [
            (s, pos, tok, False) for s, p in enumerate(prompts) for pos, tok in enumerate(p[:-1])
        ]
        for start in range(0, len(body), self.n_batch):
            self._fill(body[start : start + self.n_batch])
            self._decode()
        self._fill([(s, len(p) - 1, p[-1], True) for s, p in enumerate(prompts)])
        self._decode()

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (seq, pos, tok, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _sample(self, index: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.greedy, self.ctx, index))

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.greedy)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def without_extra_buffer_types() -> None:
    """Load `Llama` models as flexserve's LlamaModel does: no extra (repacked, e.g. AMX)
    weight buffers, so that both run the same kernels."""
    bindings = llama_cpp.llama_cpp  # what llama_cpp.Llama calls
    default_params = bindings.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params


def llama_cpp_single(llama: Llama, prompt: str, max_tokens: int) -> int:
    llama.reset()  # type: ignore[no-untyped-call]  # no prefix reuse: prefill like the others
    result: Any = llama.create_chat_completion(
        [{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens
    )
    return int(result["usage"]["completion_tokens"])


def timed(run: Callable[[], int]) -> tuple[float, int]:
    """(output tokens/s, output tokens) of one run."""
    start = time.perf_counter()
    produced = run()
    return produced / (time.perf_counter() - start), produced


def measurements(s: Setup) -> dict[str, Callable[[], int]]:
    one, eight = s.prompts[:1], s.prompts[:SLOTS]
    return {
        "engine_1": lambda: asyncio.run(engine_run(s.backend, one, s.max_tokens)),
        "engine_8": lambda: asyncio.run(engine_run(s.backend, eight, s.max_tokens)),
        "raw_8": lambda: s.raw.run(eight, s.max_tokens),
        "llama_cpp_1": lambda: llama_cpp_single(s.llama, PROMPTS[0], s.max_tokens),
    }


def measure(s: Setup, repeats: int) -> dict[str, list[tuple[float, int]]]:
    runs = measurements(s)
    for run in runs.values():  # warm-up: page in weights, size buffers
        run()
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
        for name, run in runs.items():
            samples[name].append(timed(run))
    return samples


def report(
    samples: dict[str, list[tuple[float, int]]], max_tokens: int, n_threads: int
) -> dict[str, float]:
    median = {name: statistics.median(rate for rate, _ in runs) for name, runs in samples.items()}
    print(f"max_tokens={max_tokens} temperature=0 n_threads={n_threads}, prefill included")
    print(f"{'measurement':<13}{'median tok/s':>13}{'tokens/run':>12}   tok/s of each run")
    for name, runs in samples.items():
        produced = "/".join(sorted({str(n) for _, n in runs}))
        each = " ".join(f"{rate:.1f}" for rate, _ in runs)
        print(f"{name:<13}{median[name]:>13.1f}{produced:>12}   {each}")
    paired = {
        "engine_8/raw_8": paired_ratio(samples["engine_8"], samples["raw_8"]),
        "engine_1/llama_cpp_1": paired_ratio(samples["engine_1"], samples["llama_cpp_1"]),
    }
    print("median of per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    return {
        "tok_s_1": round(median["engine_1"], 1),
        "tok_s_8": round(median["engine_8"], 1),
        "raw_tok_s_8": round(median["raw_8"], 1),
        "ratio_vs_raw_8": round(median["engine_8"] / median["raw_8"], 3),
        "single_ratio_vs_llama_cpp": round(median["engine_1"] / median["llama_cpp_1"], 3),
    }


def paired_ratio(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> float:
    """Median of the ratios of runs made back to back (robust to drifting machine load)."""
    return statistics.median(x / y for (x, _), (y, _) in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    without_extra_buffer_types()
    path = str(default_model_path())
    backend = EmbeddedBackend(
        path,
        slots=SLOTS,
        context_per_slot=CONTEXT_PER_SLOT,
        prefill_chunk=PREFILL_CHUNK,
        n_threads=args.threads,
    )
    asyncio.run(backend.start())
    prompts = [backend.encode_chat([ChatMessage("user", p)]) for p in PROMPTS]
    model = LlamaModel(path)
    raw = RawBatchLoop(model, SLOTS, args.threads)
    llama = Llama(
        path,
        n_ctx=CONTEXT_PER_SLOT,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=True,
        verbose=False,
    )
    try:
        setup = Setup(backend, raw, llama, prompts, args.max_tokens)
        summary = report(measure(setup, args.repeats), args.max_tokens, args.threads)
    finally:
        llama.close()
        raw.close()
        model.free()
        asyncio.run(backend.close())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
