"""Prediction accuracy: does the quoted wait come true?

    .venv/bin/python bench/predictions.py [--slots K] [--duration S] [--loads 0.95,1.25]

What it does:

- starts `flexserve serve` as a subprocess (simulated backend: K=8 slots, a=50 ms,
  c=20 ms per token; requests ask `max_tokens` 32 and the answers end at 24 tokens,
  so `max_tokens` is a loose bound, as it usually is);
- in a process of its own (bench/_load.py's raw HTTP client), sends streaming flex
  requests as a Poisson process at each `--loads` share of capacity (capacity = K /
  (a + b*prompt + 24*c)), each preceded by `GET /v1/flex/quote` for a request of the
  same size from the same tenant; the actual wait is the time to the response headers,
  which a streaming flex request gets when its job starts;
- a warm-up (not measured) lets the server learn the service rate and answer lengths,
  as a running server has; between loads the queue drains;
- reports, per load, the share of waits over 1 s predicted within +-25 %, the median
  ratio predicted/actual, and mean predicted vs mean actual.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import _load
from _load import Result, Target
from _server import Server

KEY = "bench-predictions-key"
TTFT_MS, PER_PROMPT_TOKEN_MS, TPOT_MS = 50.0, 0.05, 20.0
MAX_TOKENS, ANSWER_TOKENS = 32, 24


@dataclass
class Sample:
    load: str
    predicted: float | None  # None: the quote refused (would be shed)
    actual: float | None  # None: not started (shed or failed)
    outcome: str


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per load")
    p.add_argument("--loads", default="0.95,1.25", help="arrival rates as shares of capacity")
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--dump", help="write every (load, predicted, actual, outcome) here")
    args = p.parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]
    env = {
        "FLEXSERVE_API_KEYS": json.dumps({KEY: "quoted"}),
        "FLEXSERVE_SIMULATED__NATURAL_OUTPUT_TOKENS": str(ANSWER_TOKENS),
        "FLEXSERVE_SIMULATED__TTFT_PER_PROMPT_TOKEN_MS": str(PER_PROMPT_TOKEN_MS),
    }
    server_args = ["--backend", "simulated", "--slots", str(args.slots), "--log-level", "warning"]
    server_args += ["--sim-ttft-ms", str(TTFT_MS), "--sim-tpot-ms", str(TPOT_MS)]
    started = time.monotonic()
    with Server(server_args, env) as server:
        model = server.wait_healthy(30)["model"]
        target = Target("127.0.0.1", server.port, model, KEY)
        ctx = mp.get_context("spawn")
        out: Any = ctx.Queue()
        proc = ctx.Process(
            target=_generator_main,
            args=(target, args.slots, loads, args.duration, args.warmup, args.seed, out),
            name="bench-quotes",
        )
        proc.start()
        prompt, samples = out.get(timeout=args.warmup + len(loads) * (args.duration + 200))
        proc.join(timeout=10)
    if args.dump:
        with open(args.dump, "w") as out_file:
            for sample in samples:
                out_file.write(json.dumps(sample.__dict__) + "\n")
    summary = report(samples, loads, args, prompt, time.monotonic() - started)
    print(json.dumps(summary, separators=(",", ":")))
    return 0


def capacity(slots: int, prompt: int) -> float:
    per_request = TTFT_MS + PER_PROMPT_TOKEN_MS * prompt + ANSWER_TOKENS * TPOT_MS
    return slots / (per_request / 1000.0)


# ---- the load generator (its own process) ----------------------------------------------


def _generator_main(
    target: Target,
    slots: int,
    loads: list[float],
    duration: float,
    warmup: float,
    seed: int,
    out: Any,
) -> None:
    out.put(asyncio.run(_generate(target, slots, loads, duration, warmup, seed)))


async def _generate(
    target: Target, slots: int, loads: list[float], duration: float, warmup: float, seed: int
) -> tuple[int, list[Sample]]:
    first = await _request(target, 0)
    if first.usage_prompt is None:
        raise RuntimeError(f"first request failed: {first.status} {first.code} {first.detail}")
    prompt = first.usage_prompt
    rng = random.Random(seed)
    rate = capacity(slots, prompt)
    await _phase(target, "warmup", 0.8 * rate, warmup, prompt, rng)
    samples: list[Sample] = []
    for load in loads:
        samples += await _phase(target, f"{load:g}", load * rate, duration, prompt, rng)
    return prompt, samples


async def _phase(
    target: Target, label: str, rate: float, duration: float, prompt: int, rng: random.Random
) -> list[Sample]:
    """Poisson arrivals for `duration`; then wait for every request to end."""
    tasks: list[asyncio.Task[Sample]] = []
    end = time.monotonic() + duration
    index = 0
    while True:
        await asyncio.sleep(rng.expovariate(rate))
        if time.monotonic() >= end:
            break
        index += 1
        tasks.append(asyncio.create_task(_quoted(target, label, prompt, index)))
    return list(await asyncio.gather(*tasks))


async def _quoted(target: Target, label: str, prompt: int, index: int) -> Sample:
    path = f"/v1/flex/quote?prompt_tokens={prompt}&max_tokens={MAX_TOKENS}"
    status, quote = await _load.get_json(target, path, 30.0)
    flex = (quote or {}).get("tiers", {}).get("flex", {}) if status == 200 else {}
    predicted = flex.get("predicted_wait_seconds")
    res = await _request(target, index)
    started = res.status == 200 and res.t_head is not None
    actual = res.t_head - res.t_send if started and res.t_head is not None else None
    return Sample(label, predicted, actual, res.outcome)


async def _request(target: Target, index: int) -> Result:
    payload = {
        "model": target.model,
        "messages": _load._prompt("quoted", index),
        "service_tier": "flex",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
    }
    res = Result("flex", "quoted", stream=True)
    await _load.chat(target, res, payload, 600.0)
    _load.classify(res, ANSWER_TOKENS)
    return res


# ---- the report --------------------------------------------------------------------


def report(
    samples: list[Sample],
    loads: list[float],
    args: argparse.Namespace,
    prompt: int,
    elapsed: float,
) -> dict[str, Any]:
    rate = capacity(args.slots, prompt)
    print(f"flexserve prediction accuracy — simulated backend, K={args.slots}")
    print(
        f"  a={TTFT_MS:g} ms, c={TPOT_MS:g} ms/token; requests max_tokens {MAX_TOKENS}, answers "
        f"{ANSWER_TOKENS} tokens, prompt {prompt} tokens; capacity {rate:.2f} req/s"
    )
    print(f"  {args.duration:g} s of Poisson flex arrivals per load, {args.warmup:g} s warm-up")
    print()
    print(
        f"  {'load':>5} {'n':>5} {'>1s':>5} {'within25%':>10} {'median p/a':>11} "
        f"{'mean pred':>10} {'mean act':>9} {'all within25%':>14} {'not ok':>7}"
    )
    summary: dict[str, Any] = {}
    for load in loads:
        label = f"{load:g}"
        mine = [s for s in samples if s.load == label]
        timed = [s for s in mine if s.predicted is not None and s.actual is not None]
        long = [s for s in timed if s.actual is not None and s.actual > 1.0]
        within = _within(long)
        ratios = [s.predicted / s.actual for s in long if s.predicted is not None and s.actual]
        mean_pred = _mean([s.predicted for s in long if s.predicted is not None])
        mean_act = _mean([s.actual for s in long if s.actual is not None])
        all_within = _within([s for s in timed if s.actual is not None and s.actual > 0.25])
        bad = sum(s.outcome != "ok" for s in mine)
        median = statistics.median(ratios) if ratios else float("nan")
        print(
            f"  {label:>5} {len(mine):>5} {len(long):>5} {within:>10.1%} {median:>11.3f} "
            f"{mean_pred:>9.2f}s {mean_act:>8.2f}s {all_within:>14.1%} {bad:>7}"
        )
        summary[label] = {
            "requests": len(mine),
            "waits_over_1s": len(long),
            "within_25pct": round(within, 4),
            "median_predicted_over_actual": round(median, 4),
            "mean_predicted_s": round(mean_pred, 3),
            "mean_actual_s": round(mean_act, 3),
            "not_ok": bad,
        }
    print("  (>1s = requests that waited over 1 s to start; within25% = share of those whose")
    print("   quote, taken just before sending, was within +-25 % of the wait; all within25% =")
    print("   the same over waits above 0.25 s)")
    print(f"  elapsed {elapsed:.1f} s")
    return {"loads": summary, "k": args.slots, "capacity_rps": round(rate, 3)}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _within(samples: list[Sample], tolerance: float = 0.25) -> float:
    if not samples:
        return float("nan")
    hits = sum(
        abs(s.predicted - s.actual) <= tolerance * s.actual
        for s in samples
        if s.predicted is not None and s.actual is not None
    )
    return hits / len(samples)


if __name__ == "__main__":
    sys.exit(main())
