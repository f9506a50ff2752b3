"""Fair admission: one tenant floods flex with tiny requests; is another still served?

    .venv/bin/python bench/fairness.py [--flood N] [--duration S]

What it does:

- starts `flexserve serve` as a subprocess (simulated backend, K=8, a=50 ms, c=20 ms per
  token, the default flex queue bound of 1000 jobs), with one API key per tenant;
- in a process of its own (bench/_load.py's raw HTTP client): tenant A sends `--flood`
  tiny flex requests (`max_tokens` 8) at 150/s, far more than the queue bound and the
  backend's capacity; two seconds in, tenant B sends flex requests of the same size as
  a Poisson process at 3/s for `--duration` seconds (streaming, so the time to the
  response headers is the wait for its job to start);
- reports, per tenant, requests sent, admitted (not 429), completed, and the wait to
  start; B's share of the completions while both were queued.

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
from typing import Any

import _load
from _load import Result, Target
from _server import Server

KEYS = {"A": "bench-fair-key-a", "B": "bench-fair-key-b"}
MAX_TOKENS = 8
B_RATE = 3.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flood", type=int, default=3000, help="tenant A's requests")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of B's arrivals")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    env = {
        "FLEXSERVE_API_KEYS": json.dumps({key: tenant for tenant, key in KEYS.items()}),
        "FLEXSERVE_SIMULATED__NATURAL_OUTPUT_TOKENS": "24",
    }
    server_args = ["--backend", "simulated", "--slots", "8", "--log-level", "warning"]
    server_args += ["--sim-ttft-ms", "50", "--sim-tpot-ms", "20"]
    started = time.monotonic()
    with Server(server_args, env) as server:
        model = server.wait_healthy(30)["model"]
        targets = {t: Target("127.0.0.1", server.port, model, k) for t, k in KEYS.items()}
        ctx = mp.get_context("spawn")
        out: Any = ctx.Queue()
        proc = ctx.Process(
            target=_generator_main,
            args=(targets, args.flood, args.duration, args.seed, out),
            name="bench-fairness",
        )
        proc.start()
        results: dict[str, list[Result]] = out.get(timeout=900)
        proc.join(timeout=10)
    summary = report(results, args, time.monotonic() - started)
    print(json.dumps(summary, separators=(",", ":")))
    return 0


def _generator_main(
    targets: dict[str, Target], flood: int, duration: float, seed: int, out: Any
) -> None:
    out.put(asyncio.run(_generate(targets, flood, duration, seed)))


async def _generate(
    targets: dict[str, Target], flood: int, duration: float, seed: int
) -> dict[str, list[Result]]:
    rng = random.Random(seed)

    async def flood_a() -> list[Result]:
        tasks = []
        for i in range(flood):
            tasks.append(asyncio.create_task(_one(targets["A"], "A", i, stream=False)))
            await asyncio.sleep(1 / 150)
        return list(await asyncio.gather(*tasks))

    async def steady_b() -> list[Result]:
        await asyncio.sleep(2.0)
        tasks = []
        end = time.monotonic() + duration
        i = 0
        while time.monotonic() < end:
            i += 1
            tasks.append(asyncio.create_task(_one(targets["B"], "B", i, stream=True)))
            await asyncio.sleep(rng.expovariate(B_RATE))
        return list(await asyncio.gather(*tasks))

    a, b = await asyncio.gather(flood_a(), steady_b())
    return {"A": a, "B": b}


async def _one(target: Target, tenant: str, index: int, stream: bool) -> Result:
    payload: dict[str, Any] = {
        "model": target.model,
        "messages": _load._prompt(f"tenant {tenant}", index),
        "service_tier": "flex",
        "stream": stream,
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    res = Result("flex", tenant, stream=stream)
    await _load.chat(target, res, payload, 600.0)
    _load.classify(res, MAX_TOKENS)
    return res


def report(results: dict[str, list[Result]], args: argparse.Namespace, elapsed: float) -> Any:
    print("flexserve fair admission — simulated backend, K=8, flex queue bound 1000 jobs")
    print(
        f"  tenant A: {args.flood} flex requests (max_tokens {MAX_TOKENS}) at 150/s; tenant B: "
        f"Poisson {B_RATE:g}/s for {args.duration:g} s, same size, from 2 s in"
    )
    print()
    print(f"  {'tenant':<6} {'sent':>5} {'admitted':>9} {'completed':>9} {'429':>5} {'errors':>6}")
    summary: dict[str, Any] = {}
    for tenant, rs in results.items():
        sent = len(rs)
        shed = sum(r.outcome == "shed" for r in rs)
        done = sum(r.outcome == "ok" for r in rs)
        errors = sent - shed - done
        print(f"  {tenant:<6} {sent:>5} {sent - shed:>9} {done:>9} {shed:>5} {errors:>6}")
        summary[tenant] = {"sent": sent, "admitted": sent - shed, "completed": done, "shed": shed}
    b_waits = [r.t_head - r.t_send for r in results["B"] if r.outcome == "ok" and r.t_head]
    if b_waits:
        p50 = statistics.median(b_waits)
        worst = max(b_waits)
        print(f"  B's wait to start: median {p50:.2f} s, max {worst:.2f} s")
        summary["B"]["wait_p50_s"] = round(p50, 3)
        summary["B"]["wait_max_s"] = round(worst, 3)
    b = summary["B"]
    b["admitted_share"] = round(b["admitted"] / b["sent"], 4) if b["sent"] else None
    print(f"  B admitted: {b['admitted_share']:.1%} of its requests")
    print(f"  elapsed {elapsed:.1f} s")
    return summary


if __name__ == "__main__":
    sys.exit(main())
