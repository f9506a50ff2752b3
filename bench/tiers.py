"""Tier isolation benchmark: does a flex flood change what the default tier sees?

    .venv/bin/python bench/tiers.py [--slots K] [--window S] [--pairs N]
                                    [--backend simulated|embedded] [--deep N]
                                    [--slowdown-budgets 1.1,1.25,1.5,off]

What it does (DESIGN.md, "Benchmarks: what the figures mean"):

- starts `flexserve serve` as a subprocess (simulated backend by default: K=8 slots,
  a=50 ms, c=20 ms per token, 32-token answers, `flex_max_wait` 2 s);
- runs the load in two processes of their own, on raw HTTP (bench/_load.py): a prober
  that sends default-tier streaming requests as a Poisson process at ~40 % of capacity
  (capacity = K / (a + b*prompt + n*tpot)), and a flood of 3*K closed-loop flex workers
  (half streaming). About 2*K of them queue, more than 2 s of work, so honest admission
  sheds a share of the flood; a shed worker waits for Retry-After before its next try.
  (A closed-loop flood never builds a queue longer than its own size, so with a
  flex_max_wait of 10-20 s nothing would ever be shed; an open-loop flood that outgrows
  such a wait would need as long again to drain, beyond this run's 2-minute budget.)
  `--impatient F` makes a share F of flex requests send X-Flex-Max-Wait 0.5-4 s;
- `--deep N` is the deep-backlog mode instead: the flood is open-loop and keeps a deep
  flex queue, as flex exists for. Each flood phase sends a burst of N flex requests
  (150/s), then Poisson arrivals at the capacity the default load leaves, so about N
  stay queued at the server's default `flex_max_wait` (540 s; the queue bound is raised
  to 4 N so that nothing is refused for room). A flood window starts 3 s after the
  burst has been sent, so it measures the backlog, not the burst's arrival. Switching
  the flood off hangs up on every open flex request (the server cancels their jobs),
  and the alone window starts only when the server's flex queue is empty again. The
  queue depth at each flood window's start and end is read from /metrics;
- interleaves `--pairs` pairs of (alone, flood) windows of `--window` seconds after a
  warm-up, in ABBA order (alone0 flood0 flood1 alone1 alone2 flood2 ...), so slow drift
  cancels and one flood ramp and drain serve two flood windows; ramp and drain are
  outside every window. Both windows of a pair replay the *same* Poisson arrival
  offsets (common random numbers), so queueing among default requests themselves is the
  same on both sides and the ratio shows what the flood adds;
- per window: default-tier p99 of TTFT (time to the first content token), TPOT and
  end-to-end latency; per pair the ratio flood/alone; reported as the median ratio and
  its spread (min-max);
- utilization of the flood windows = delta `flexserve_backend_busy_slot_seconds_total`
  / (K * window), the window being the time between the two /metrics scrapes;
- recomputed output tokens = delta `flexserve_backend_sampled_tokens_total` - the output
  tokens clients received (whole answers: their usage; cut answers: what streamed in);
- flex: sent, completed (200, whole answer), shed (429 resource_unavailable), errors.
  The flood is drained (bounded) before counting, so every request sent is accounted.

`--slowdown-budgets` runs all of the above once per latency budget
(`scheduler.interactive_slowdown_max`, "off" = none), each on a fresh server, at the
same default load (capacity is measured once), and ends with one table: per budget,
the default tier's p99 TPOT ratio flood/alone (median of the pairs, spread) and the
utilization of the flood windows, i.e. what each budget costs.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

import _load
from _load import LoadConfig, Result, Target
from _server import Server, metric

DEFAULT_KEY = "bench-default-key"
FLEX_KEY = "bench-flex-key"
BUSY = "flexserve_backend_busy_slot_seconds_total"
SAMPLED = "flexserve_backend_sampled_tokens_total"
PREFILLED = "flexserve_backend_prefilled_tokens_total"
REQUESTS = "flexserve_requests_total"
PREEMPTIONS = "flexserve_preemptions_total"
QUEUED = "flexserve_queued_jobs"
BURST_RPS = 150.0
BUDGET_ENV = "FLEXSERVE_SCHEDULER__INTERACTIVE_SLOWDOWN_MAX"


@dataclass
class Plan:
    backend: str
    slots: int
    window: float
    pairs: int
    load: float  # default-tier arrival rate as a share of capacity
    max_tokens: int
    natural_tokens: int  # simulated answer length (max_tokens cuts it)
    ttft_ms: float
    ttft_per_prompt_token_ms: float
    tpot_ms: float
    flex_max_wait: float
    flood_workers: int
    impatient: float
    ramp: float  # flood on before its window starts
    warmup: float
    seed: int
    server_log_level: str
    server_env: dict[str, str]
    deep: int  # deep-backlog mode: flex requests kept queued (0 = closed-loop flood)


def parse_plan(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["simulated", "embedded"], default="simulated")
    p.add_argument("--slots", type=int, help="K (default 8 simulated, 4 embedded)")
    p.add_argument("--window", type=float, help="seconds per window (10 simulated, 30 embedded)")
    p.add_argument("--pairs", type=int, help="(alone, flood) window pairs (>= 3; default 5)")
    p.add_argument("--load", type=float, help="default load / capacity (0.40 sim, 0.35 emb)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--natural-tokens", type=int, default=32, help="simulated answer length")
    p.add_argument("--ttft-ms", type=float, default=50.0, help="simulated a")
    p.add_argument("--tpot-ms", type=float, default=20.0, help="simulated c")
    p.add_argument("--flex-max-wait", type=float, help="server flex_max_wait (15 sim, 60 emb)")
    p.add_argument("--flood-workers", type=int, help="flex requests kept in flight (3*K)")
    p.add_argument("--impatient", type=float, default=0.0, help="share with X-Flex-Max-Wait")
    p.add_argument("--deep", type=int, default=0, help="open-loop flood keeping N flex queued")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--server-log-level", default="warning")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra FLEXSERVE_* setting for the server (repeatable), for experiments",
    )
    p.add_argument(
        "--slowdown-budgets",
        type=_budgets,
        metavar="B1,B2,...",
        help="run once per latency budget (interactive_slowdown_max; 'off' = none), each on "
        "a server of its own, and print one table (defaults then: 3 pairs of 15 s windows)",
    )
    p.add_argument(
        "--capacity",
        type=float,
        help="requests/s to take as capacity instead of measuring it at start (a measure "
        "taken while other processes hog the CPU can be a tenth of the real one)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --slowdown-budgets: run the list this often, every other time reversed",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the server's data dir")
    p.add_argument("--dump", type=Path, help="write every request's record (JSON lines) here")
    a = p.parse_args(argv)
    embedded = a.backend == "embedded"
    slots = a.slots or (4 if embedded else 8)
    budgets = a.slowdown_budgets is not None  # several runs: shorter ones
    plan = Plan(
        backend=a.backend,
        slots=slots,
        window=a.window or (15.0 if budgets else 30.0 if embedded else 8.0),
        pairs=a.pairs or (3 if budgets else 5),
        load=a.load or (0.35 if embedded else 0.40),
        max_tokens=a.max_tokens,
        natural_tokens=a.natural_tokens,
        ttft_ms=a.ttft_ms,
        ttft_per_prompt_token_ms=0.05,  # the SimulatedSettings default (b)
        tpot_ms=a.tpot_ms,
        flex_max_wait=a.flex_max_wait or (60.0 if embedded else 540.0 if a.deep else 2.0),
        flood_workers=a.flood_workers or 3 * slots,
        impatient=a.impatient,
        ramp=3.0 if a.deep else 2.0 if embedded else 0.5,  # deep: after its burst
        warmup=6.0 if embedded else 2.0,
        seed=a.seed,
        server_log_level=a.server_log_level,
        server_env=dict(item.split("=", 1) for item in a.server_env),
        deep=a.deep,
    )
    if plan.pairs < 1 or plan.window <= 0 or plan.slots < 1:
        p.error("--pairs, --window and --slots must be positive")
    return plan, a


def server_args(plan: Plan) -> tuple[list[str], dict[str, str]]:
    args = ["--backend", plan.backend, "--slots", str(plan.slots)]
    args += ["--log-level", plan.server_log_level]
    env = {
        "FLEXSERVE_API_KEYS": json.dumps({DEFAULT_KEY: "interactive", FLEX_KEY: "flood"}),
        "FLEXSERVE_SCHEDULER__FLEX_MAX_WAIT": str(plan.flex_max_wait),
    }
    if plan.deep:
        env["FLEXSERVE_SCHEDULER__FLEX_QUEUE_MAX_JOBS"] = str(4 * plan.deep)
    if plan.backend == "simulated":
        args += ["--sim-ttft-ms", str(plan.ttft_ms), "--sim-tpot-ms", str(plan.tpot_ms)]
        env["FLEXSERVE_SIMULATED__NATURAL_OUTPUT_TOKENS"] = str(plan.natural_tokens)
        env["FLEXSERVE_SIMULATED__TTFT_PER_PROMPT_TOKEN_MS"] = str(plan.ttft_per_prompt_token_ms)
    env.update(plan.server_env)
    return args, env


# ---- statistics ------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def poisson_offsets(rate: float, length: float, rng: random.Random) -> list[float]:
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < length:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---- the run ---------------------------------------------------------------------------


@dataclass
class Window:
    label: str
    kind: str  # alone | flood
    pair: int
    t0: float  # scrape times (monotonic)
    t1: float
    busy: float  # delta busy slot-seconds
    server_cpu: float  # delta server CPU seconds
    queued_flex: tuple[float, float] = (0.0, 0.0)  # flex queue at the window's start, end
    drain: float = 0.0  # flood drain time after the window


class Bench:
    def __init__(
        self,
        plan: Plan,
        server: Server,
        target_default: Target,
        target_flex: Target,
        spare_rps: float = 0.0,
    ):
        self.plan = plan
        self.server = server
        ctx = mp.get_context("spawn")
        expected = (
            min(plan.natural_tokens, plan.max_tokens) if plan.backend == "simulated" else None
        )
        timeout = plan.flex_max_wait + 60.0
        self.default_cfg = LoadConfig(target_default, plan.max_tokens, expected)
        self.flex_cfg = LoadConfig(
            target_flex,
            plan.max_tokens,
            expected,
            flex_timeout=timeout,
            flood_workers=plan.flood_workers,
            impatient_fraction=plan.impatient,
            seed=plan.seed,
            backlog=plan.deep,
            burst_rps=BURST_RPS,
            topup_rps=spare_rps,
        )
        self.p_cmd, self.p_out = ctx.Queue(), ctx.Queue()
        self.f_cmd, self.f_out = ctx.Queue(), ctx.Queue()
        self.p_inflight = ctx.RawValue("i", 0)
        self.f_inflight = ctx.RawValue("i", 0)
        self.f_state = ctx.RawValue("i", _load.OFF)
        self.prober = ctx.Process(
            target=_load.prober_main,
            args=(self.default_cfg, self.p_cmd, self.p_out, self.p_inflight),
            name="bench-prober",
        )
        self.flood = ctx.Process(
            target=_load.deep_flood_main if plan.deep else _load.flood_main,
            args=(self.flex_cfg, self.f_cmd, self.f_out, self.f_state, self.f_inflight),
            name="bench-flood",
        )
        self.windows: list[Window] = []
        self.incidents: list[str] = []

    def start(self) -> None:
        self.prober.start()
        self.flood.start()

    def finish(self) -> tuple[list[Result], list[Result]]:
        self.p_cmd.put(("stop",))
        self.f_cmd.put(("stop",))
        timeout = self.plan.flex_max_wait + 120
        defaults: list[Result] = _collect(self.p_out, self.prober, timeout)
        flexes: list[Result] = _collect(self.f_out, self.flood, timeout)
        self.prober.join(timeout=10)
        self.flood.join(timeout=10)
        return defaults, flexes

    def check_alive(self) -> None:
        for proc in (self.prober, self.flood):
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited with {proc.exitcode}")

    def kill(self) -> None:
        for proc in (self.prober, self.flood):
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    # -- pieces of the timeline --

    def default_window(self, label: str, offsets: list[float], lead: float = 0.2) -> float:
        t0 = time.monotonic() + lead
        self.p_cmd.put(("window", label, t0, offsets))
        return t0

    def wait_prober_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.p_inflight.value > 0:
            self.check_alive()
            if time.monotonic() > end:
                self.incidents.append(f"prober still had {self.p_inflight.value} in flight")
                return
            time.sleep(0.02)

    def flood_on(self, label: str) -> None:
        """Switch the flood on; in deep mode, return once its burst has been sent (so
        that no window measures the burst's arrival rather than the backlog)."""
        self.f_cmd.put(("on", label))
        end = time.monotonic() + (5 + 4 * self.plan.deep / BURST_RPS)
        while self.f_state.value != _load.ON and time.monotonic() < end:
            self.check_alive()
            time.sleep(0.005)
        if self.f_state.value != _load.ON:
            self.incidents.append(f"flood {label}: not on in time")

    def flood_off_and_drain(self, timeout: float) -> float:
        start = time.monotonic()
        self.f_cmd.put(("off",))
        end = start + timeout
        while self.f_state.value != _load.OFF or self.f_inflight.value > 0:
            self.check_alive()
            if time.monotonic() > end:
                self.incidents.append(
                    f"flood drain: {self.f_inflight.value} flex still in flight after "
                    f"{timeout:.0f} s"
                )
                break
            time.sleep(0.02)
        if self.plan.deep:  # hung-up requests leave the server's queue as it notices
            while metric(self.server.metrics()[1], QUEUED, tier="flex") > 0:
                if time.monotonic() > end:
                    self.incidents.append("flood drain: the server still queues flex")
                    break
                time.sleep(0.1)
        return time.monotonic() - start

    def measured_window(self, label: str, kind: str, pair: int, offsets: list[float]) -> None:
        pid = self.server.proc.pid if self.server.proc else 0
        t_start = self.default_window(label, offsets)
        _sleep_until(t_start)
        t0, m0 = self.server.metrics()
        c0 = cpu_seconds(pid)
        _sleep_until(t_start + self.plan.window)
        t1, m1 = self.server.metrics()
        c1 = cpu_seconds(pid)
        busy = metric(m1, BUSY) - metric(m0, BUSY)
        queued = (metric(m0, QUEUED, tier="flex"), metric(m1, QUEUED, tier="flex"))
        self.windows.append(Window(label, kind, pair, t0, t1, busy, c1 - c0, queued))

    def run(self, rate: float) -> None:
        """Warm-up, then the pairs in ABBA order: alone0 flood0 flood1 alone1 alone2 ...,
        so that drift cancels and one ramp and one drain serve two flood windows."""
        plan = self.plan
        service = plan.slots * plan.load / rate  # seconds one request holds a slot
        idle_timeout = service * 4 + 30
        drain_timeout = plan.flex_max_wait + service * 4 + 10
        rng = random.Random(plan.seed)
        self.flood_on("warmup")
        self.default_window("warmup", poisson_offsets(rate, plan.warmup, rng))
        time.sleep(plan.warmup + 0.2)
        self.wait_prober_idle(idle_timeout)
        flooding = True
        for pair in range(plan.pairs):
            offsets = poisson_offsets(rate, plan.window, random.Random(plan.seed * 1000 + pair))
            kinds = ("alone", "flood") if pair % 2 == 0 else ("flood", "alone")
            for kind in kinds:
                if kind == "alone" and flooding:
                    drain = self.flood_off_and_drain(drain_timeout)
                    if self.windows and self.windows[-1].kind == "flood":
                        self.windows[-1].drain = drain
                    flooding = False
                elif kind == "flood" and not flooding:
                    self.flood_on("ramp")
                    time.sleep(plan.ramp)
                    flooding = True
                label = f"{kind}{pair}"
                if kind == "flood":
                    self.f_cmd.put(("on", label))
                self.measured_window(label, kind, pair, offsets)
                if kind == "flood":
                    self.f_cmd.put(("on", "gap"))
                self.wait_prober_idle(idle_timeout)
        if flooding:
            self.windows[-1].drain = self.flood_off_and_drain(drain_timeout)


def _collect(queue: Any, proc: Any, timeout: float) -> Any:
    """The result a load process puts on its queue, or an error if it died first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return queue.get(timeout=0.5)
        except Empty:
            if not proc.is_alive() and queue.empty():
                raise RuntimeError(f"{proc.name} exited with {proc.exitcode}") from None
    raise RuntimeError(f"{proc.name} sent no results in {timeout:.0f} s")


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# ---- calibration (before any load, in this process) ------------------------------------


def calibrate(plan: Plan, target: Target) -> tuple[float, dict[str, Any]]:
    """Capacity in requests/s: the DESIGN formula (simulated) or measured (embedded)."""
    payload = {
        "model": target.model,
        "messages": _load._prompt("interactive", 0),
        "service_tier": "default",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": plan.max_tokens,
    }

    async def one() -> Result:
        res = Result("default", "calibrate", stream=True)
        return await _load.chat(target, res, payload, 300.0)

    async def rounds(count: int) -> tuple[list[Result], float]:
        start = time.monotonic()
        out: list[Result] = []
        for _ in range(count):
            out += await asyncio.gather(*(one() for _ in range(plan.slots)))
        return out, time.monotonic() - start

    first = asyncio.run(one())
    if first.status != 200 or first.usage_prompt is None:
        raise RuntimeError(
            f"calibration request failed: {first.status} {first.code} {first.detail}"
        )
    prompt = first.usage_prompt
    if plan.backend == "simulated":
        n = min(plan.natural_tokens, plan.max_tokens)
        per_request = (
            plan.ttft_ms + plan.ttft_per_prompt_token_ms * prompt + n * plan.tpot_ms
        ) / 1000.0
        return plan.slots / per_request, {"prompt_tokens": prompt, "service_s": per_request}
    results, elapsed = asyncio.run(rounds(2))
    done = [r for r in results if r.status == 200]
    capacity = len(done) / elapsed
    tokens = statistics.mean(r.usage_completion or 0 for r in done) if done else 0
    return capacity, {"prompt_tokens": prompt, "measured_s": elapsed, "mean_output": tokens}


# ---- the report ------------------------------------------------------------------------


def window_stats(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.outcome == "ok"]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    return {
        "n": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "ttft_max": max(ttft) if ttft else math.nan,
        "tpot_p99": pct(tpot, 0.99),
        "e2e_p99": pct(e2e, 0.99),
    }


def in_flight(results: list[Result], t0: float, t1: float) -> float:
    """Mean number of requests open during [t0, t1] (time-weighted)."""
    total = 0.0
    for r in results:
        end = r.t_end if r.t_end is not None else t1
        total += max(0.0, min(end, t1) - max(r.t_send, t0))
    return total / (t1 - t0)


def flex_counts(results: list[Result]) -> dict[str, int]:
    return {
        "sent": len(results),
        "completed": sum(r.outcome == "ok" for r in results),
        "shed": sum(r.outcome == "shed" for r in results),
        "cancelled": sum(r.outcome == "cancelled" for r in results),
        "errors": sum(r.outcome == "error" for r in results),
        "paused_streams": sum(r.paused > 0 for r in results if r.outcome == "ok"),
    }


def report(
    plan: Plan,
    capacity: float,
    rate: float,
    calib: dict[str, Any],
    bench: Bench,
    defaults: list[Result],
    flexes: list[Result],
    m_start: dict[Any, float],
    m_end: dict[Any, float],
    elapsed: float,
    loads: tuple[str, str],
) -> dict[str, Any]:
    by_label: dict[str, list[Result]] = {}
    for r in defaults:
        by_label.setdefault(r.label, []).append(r)
    flex_by_label: dict[str, list[Result]] = {}
    for r in flexes:
        flex_by_label.setdefault(r.label, []).append(r)

    print(f"flexserve tier isolation benchmark — backend {plan.backend}, K={plan.slots}")
    if plan.backend == "simulated":
        print(
            f"  simulated a={plan.ttft_ms:g} ms, b={plan.ttft_per_prompt_token_ms:g} ms/token, "
            f"c={plan.tpot_ms:g} ms/token, answers {min(plan.natural_tokens, plan.max_tokens)} "
            f"tokens, prompt {calib['prompt_tokens']} tokens"
        )
    print(
        f"  capacity {capacity:.2f} req/s; default load {plan.load:.0%} = {rate:.2f} req/s "
        f"(Poisson, streaming; same offsets in both windows of a pair)"
    )
    impatient = f", {plan.impatient:.0%} with X-Flex-Max-Wait 0.5-4 s" if plan.impatient else ""
    if plan.deep:
        print(
            f"  flood: deep backlog, open loop: a burst of {plan.deep} flex requests "
            f"({BURST_RPS:g}/s), then Poisson at {capacity - rate:.2f} req/s (half streaming); "
            f"server flex_max_wait {plan.flex_max_wait:g} s; off = hang up on all"
        )
    else:
        print(
            f"  flood: {plan.flood_workers} closed-loop flex workers (half streaming{impatient}); "
            f"server flex_max_wait {plan.flex_max_wait:g} s"
        )
    if plan.server_env:
        print(f"  extra server settings: {plan.server_env}")
    print(
        f"  {plan.pairs} pairs of {plan.window:g} s windows; load average {loads[0]} -> {loads[1]}"
    )
    print()
    header = (
        f"  {'window':<8} {'n':>4} {'err':>3} {'ttft p50':>9} {'ttft p99':>9} {'ttft max':>9} "
        f"{'tpot p99':>9} {'e2e p99':>8} {'util':>5} {'srv cpu':>7} "
        f"{'flex ok/shed/err':>16} {'in fl':>5} {'queue':>9} {'drain':>6}"
    )
    print(header)
    stats: dict[str, dict[str, Any]] = {}
    for w in bench.windows:
        s = window_stats(by_label.get(w.label, []))
        stats[w.label] = s
        length = w.t1 - w.t0
        util = w.busy / (plan.slots * length)
        cpu = w.server_cpu / length
        fc = flex_counts(flex_by_label.get(w.label, []))
        flex = f"{fc['completed']}/{fc['shed']}/{fc['errors']}" if w.kind == "flood" else ""
        drain = f"{w.drain:.1f}s" if w.drain else ""
        inflight = f"{in_flight(flexes, w.t0, w.t1):.0f}" if w.kind == "flood" else ""
        queue = f"{w.queued_flex[0]:.0f}-{w.queued_flex[1]:.0f}" if w.kind == "flood" else ""
        print(
            f"  {w.label:<8} {s['n']:>4} {s['errors']:>3} {_ms(s['ttft_p50'])} "
            f"{_ms(s['ttft_p99'])} {_ms(s['ttft_max'])} {_ms(s['tpot_p99'])} "
            f"{s['e2e_p99']:>7.3f}s {util:>5.2f} {cpu:>6.0%} {flex:>16} {inflight:>5} "
            f"{queue:>9} {drain:>6}"
        )
    print("  (times in ms unless marked; util = busy slot-s / (K x window); srv cpu = server")
    print("   process CPU / window, 100% = one core; flex counted by send time; in fl = mean")
    print("   flex requests open during the window; queue = flex queued at the server at the")
    print("   window's start-end; drain = flood wind-down after it)")
    print()

    ratios: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}
    for pair in range(plan.pairs):
        alone, flood = stats.get(f"alone{pair}"), stats.get(f"flood{pair}")
        if not alone or not flood:
            continue
        for key in ratios:
            ratios[key].append(flood[f"{key}_p99"] / alone[f"{key}_p99"])
    for key, values in ratios.items():
        if values:
            s = spread(values)
            listed = ", ".join(f"{v:.3f}" for v in values)
            print(
                f"  p99 {key.upper():<4} flood/alone: median {s['median']:.3f} "
                f"(spread {s['min']:.3f}-{s['max']:.3f}; pairs: {listed})"
            )

    pooled: dict[str, float] = {}
    sides: dict[str, list[Result]] = {}
    for key in ratios:
        side = {
            kind: window_stats(
                [r for w in bench.windows if w.kind == kind for r in by_label.get(w.label, [])]
            )
            for kind in ("alone", "flood")
        }
        pooled[key] = side["flood"][f"{key}_p99"] / side["alone"][f"{key}_p99"]
    for kind in ("alone", "flood"):
        sides[kind] = [
            r for w in bench.windows if w.kind == kind for r in by_label.get(w.label, [])
        ]
    mean_tpot = {
        kind: statistics.fmean(t for r in rs if r.outcome == "ok" and (t := r.tpot) is not None)
        for kind, rs in sides.items()
        if any(r.tpot is not None for r in rs)
    }
    tpot_mean_ratio = mean_tpot["flood"] / mean_tpot["alone"] if len(mean_tpot) == 2 else math.nan
    print(
        "  pooled over all windows (n = "
        f"{sum(len(by_label.get(w.label, [])) for w in bench.windows if w.kind == 'flood')} "
        "per side), p99 flood/alone: "
        + ", ".join(f"{key.upper()} {value:.3f}" for key, value in pooled.items())
        + f"; mean TPOT {tpot_mean_ratio:.3f}"
    )

    flood_windows = [w for w in bench.windows if w.kind == "flood"]
    busy = sum(w.busy for w in flood_windows)
    span = sum(plan.slots * (w.t1 - w.t0) for w in flood_windows)
    utilization = busy / span if span else math.nan
    alone_windows = [w for w in bench.windows if w.kind == "alone"]
    alone_busy = sum(w.busy for w in alone_windows)
    alone_span = sum(plan.slots * (w.t1 - w.t0) for w in alone_windows)
    alone_util = alone_busy / alone_span if alone_span else math.nan
    per_window_util = [round(w.busy / (plan.slots * (w.t1 - w.t0)), 4) for w in flood_windows]
    print(
        f"  utilization in flood windows: {utilization:.3f} (per window "
        f"{', '.join(f'{u:.3f}' for u in per_window_util)}); alone windows: {alone_util:.3f} "
        f"(expected ~{plan.load:.2f})"
    )

    default_errors = [r for r in defaults if r.outcome != "ok"]
    fc = flex_counts(flexes)
    delivered = sum(r.delivered_tokens for r in defaults + flexes)
    sampled = metric(m_end, SAMPLED) - metric(m_start, SAMPLED)
    recomputed = round(sampled - delivered)
    started_prompts = sum(r.usage_prompt or 0 for r in defaults + flexes if r.outcome == "ok")
    reprefilled = round(metric(m_end, PREFILLED) - metric(m_start, PREFILLED) - started_prompts)
    preemptions = int(
        metric(m_end, PREEMPTIONS, tier="flex") - metric(m_start, PREEMPTIONS, tier="flex")
    )
    server_flex = {
        outcome: int(
            metric(m_end, REQUESTS, tier="flex", outcome=outcome)
            - metric(m_start, REQUESTS, tier="flex", outcome=outcome)
        )
        for outcome in ("completed", "shed", "cancelled", "failed")
    }
    print(
        f"  default requests: {len(defaults)} sent, {len(default_errors)} not ok "
        f"(all windows, warm-up included)"
    )
    print(
        f"  flex: {fc['sent']} sent, {fc['completed']} completed, {fc['shed']} shed, "
        f"{fc['cancelled']} hung up by the bench, {fc['errors']} errors; "
        f"{fc['paused_streams']} streams were paused and resumed; "
        f"server counted {server_flex}, {preemptions} preemptions"
    )
    print(
        f"  output tokens: backend sampled {int(sampled)}, clients received {delivered} -> "
        f"recomputed {recomputed}; re-prefilled prompt+output tokens on resume: {reprefilled}"
    )
    waits = [r.t_head - r.t_send for r in flexes if r.stream and r.outcome == "ok" and r.t_head]
    shed_after = [r.t_end - r.t_send for r in flexes if r.outcome == "shed" and r.t_end]
    if waits:
        print(
            f"  flex wait to start (streaming, time to headers): p50 {pct(waits, 0.5):.2f} s, "
            f"p99 {pct(waits, 0.99):.2f} s, max {max(waits):.2f} s "
            f"(flex_max_wait {plan.flex_max_wait:g} s)"
        )
    if shed_after:
        print(
            f"  429s came after: p50 {pct(shed_after, 0.5):.3f} s, max {max(shed_after):.3f} s "
            f"(at arrival when ~0, at the deadline when ~flex_max_wait)"
        )
    for r in (default_errors + [r for r in flexes if r.outcome == "error"])[:8]:
        print(
            f"    ! {r.tier} {r.label} status={r.status} code={r.code} {r.detail} "
            f"finish={r.finish_reason} done={r.done}"
        )
    for incident in bench.incidents:
        print(f"    ! {incident}")
    print(f"  elapsed {elapsed:.1f} s")

    ttft = spread(ratios["ttft"]) if ratios["ttft"] else None
    return {
        "p99_ttft_ratio": _round(ttft["median"]) if ttft else None,
        "utilization": _round(utilization),
        "default_errors": len(default_errors),
        "flex_sent": fc["sent"],
        "flex_completed": fc["completed"],
        "flex_shed": fc["shed"],
        "flex_hung_up": fc["cancelled"],
        "flex_queued_per_window": [list(w.queued_flex) for w in flood_windows],
        "recomputed_output_tokens": recomputed,
        "p99_ttft_ratio_spread": [_round(ttft["min"]), _round(ttft["max"])] if ttft else None,
        "p99_ttft_ratios": [_round(v) for v in ratios["ttft"]],
        "p99_ttft_ratio_pooled": _round(pooled["ttft"]),
        "p99_tpot_ratio": _round(spread(ratios["tpot"])["median"]) if ratios["tpot"] else None,
        "p99_tpot_ratio_spread": _minmax(ratios["tpot"]),
        "p99_tpot_ratios": [_round(v) for v in ratios["tpot"]],
        "p99_e2e_ratio": _round(spread(ratios["e2e"])["median"]) if ratios["e2e"] else None,
        "p99_e2e_ratio_spread": _minmax(ratios["e2e"]),
        "p99_tpot_ratio_pooled": _round(pooled["tpot"]),
        "p99_e2e_ratio_pooled": _round(pooled["e2e"]),
        "mean_tpot_ratio_pooled": _round(tpot_mean_ratio),
        "utilization_per_window": per_window_util,
        "utilization_alone": _round(alone_util),
        "flex_errors": fc["errors"],
        "flex_preemptions": preemptions,
        "reprefilled_tokens": reprefilled,
        "backend": plan.backend,
        "k": plan.slots,
        "windows": plan.pairs,
        "window_s": plan.window,
        "capacity_rps": _round(capacity),
        "default_rps": _round(rate),
        "elapsed_s": round(elapsed, 1),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:>9.1f}" if not math.isnan(seconds) else f"{'-':>9}"


def _round(value: float) -> float:
    return round(value, 4)


def _minmax(values: list[float]) -> list[float] | None:
    return [_round(min(values)), _round(max(values))] if values else None


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_plan(argv)
    if args.slowdown_budgets is None:
        summary, _ = run_once(plan, args, args.dump, args.capacity)
        print(json.dumps(summary, separators=(",", ":")))
        return 0
    summaries: dict[str, list[dict[str, Any]]] = {}
    capacity: float | None = args.capacity  # measured once: every budget, the same load
    for round_ in range(args.rounds):  # forward, then backward: drift cancels
        order = args.slowdown_budgets if round_ % 2 == 0 else args.slowdown_budgets[::-1]
        for budget in order:
            label = "off" if budget is None else f"{budget:g}"
            env = dict(plan.server_env)
            if budget is not None:
                env[BUDGET_ENV] = str(budget)
            suffix = f".{label}.{round_}{args.dump.suffix}" if args.dump else ""
            dump = args.dump.with_suffix(suffix) if args.dump else None
            summary, capacity = run_once(replace(plan, server_env=env), args, dump, capacity)
            summaries.setdefault(label, []).append(summary)
            print()
    print(json.dumps(budget_report(plan, summaries), separators=(",", ":")))
    return 0


def run_once(
    plan: Plan, args: argparse.Namespace, dump: Path | None, capacity: float | None = None
) -> tuple[dict[str, Any], float]:
    """One server, one interleaved run, its report; returns its summary and capacity."""
    started = time.monotonic()
    load_before = loadavg()
    srv_args, env = server_args(plan)
    with Server(srv_args, env, keep_dir=args.keep_data) as server:
        health = server.wait_healthy(300 if plan.backend == "embedded" else 30)
        model = health["model"]
        t_default = Target("127.0.0.1", server.port, model, DEFAULT_KEY)
        t_flex = Target("127.0.0.1", server.port, model, FLEX_KEY)
        measured, calib = calibrate(plan, t_default)
        capacity = capacity or measured
        rate = plan.load * capacity
        bench = Bench(plan, server, t_default, t_flex, spare_rps=capacity - rate)
        bench.start()
        try:
            _, m_start = server.metrics()
            bench.run(rate)
            defaults, flexes = bench.finish()
        finally:
            bench.kill()
        _, m_end = server.metrics()
    elapsed = time.monotonic() - started
    summary = report(
        plan,
        capacity,
        rate,
        calib,
        bench,
        defaults,
        flexes,
        m_start,
        m_end,
        elapsed,
        (load_before, loadavg()),
    )
    if dump:
        with dump.open("w") as out:
            for r in defaults + flexes:
                out.write(json.dumps({**asdict(r), "ttft": r.ttft, "e2e": r.e2e}) + "\n")
            for w in bench.windows:
                out.write(json.dumps({"window": asdict(w)}) + "\n")
    summary["plan"] = {
        k: v for k, v in asdict(plan).items() if k in ("load", "flood_workers", "deep")
    }
    return summary, capacity


def budget_report(plan: Plan, summaries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One table: per budget, the default tier's p99 TPOT ratio flood/alone (median of
    every pair of every round, spread), whether it is within the budget + 10 %, and the
    utilization of the flood windows."""
    rounds = max(len(runs) for runs in summaries.values())
    print(
        f"latency budgets (interactive_slowdown_max) — backend {plan.backend}, K={plan.slots}, "
        f"{rounds} round(s) of {plan.pairs} pairs of {plan.window:g} s windows per budget"
    )
    print(
        f"  {'budget':>6}  {'p99 TPOT ratio (spread)':>25}  {'<= +10%':>7}  {'mean TPOT':>9}  "
        f"{'p99 TTFT':>8}  {'util':>5}  {'flex done':>9}"
    )
    rows: dict[str, dict[str, Any]] = {}
    for label, runs in summaries.items():
        tpot = [v for s in runs for v in s["p99_tpot_ratios"]]
        ttft = [v for s in runs for v in s["p99_ttft_ratios"]]
        util = statistics.fmean(u for s in runs for u in s["utilization_per_window"])
        mean_tpot = statistics.fmean(s["mean_tpot_ratio_pooled"] for s in runs)
        ratio, ttft_ratio = statistics.median(tpot), statistics.median(ttft)
        limit = None if label == "off" else float(label) * 1.1
        within = "" if limit is None else ("yes" if ratio <= limit else "NO")
        done = sum(s["flex_completed"] for s in runs)
        print(
            f"  {label:>6}  {ratio:>8.3f} ({min(tpot):.3f}-{max(tpot):.3f})  {within:>7}  "
            f"{mean_tpot:>9.3f}  {ttft_ratio:>8.3f}  {util:>5.3f}  {done:>9}"
        )
        rows[label] = {
            "p99_tpot_ratio": _round(ratio),
            "p99_tpot_ratio_spread": _minmax(tpot),
            "p99_tpot_ratios": tpot,
            "within_budget_plus_10pct": None if limit is None else ratio <= limit,
            "mean_tpot_ratio_pooled": _round(mean_tpot),
            "p99_ttft_ratio": _round(ttft_ratio),
            "utilization": _round(util),
            "utilization_alone": [s["utilization_alone"] for s in runs],
            "flex_completed": done,
            "default_errors": sum(s["default_errors"] for s in runs),
            "elapsed_s": round(sum(s["elapsed_s"] for s in runs), 1),
        }
    print("  (ratio = default-tier p99 TPOT flood/alone, median over all pairs; util = flood")
    print("   windows' busy slot-s / (K x window); mean TPOT = pooled mean flood/alone, mean of")
    print("   the rounds; p99 TTFT = median ratio; flex done = completed)")
    return {
        "backend": plan.backend,
        "k": plan.slots,
        "rounds": rounds,
        "pairs": plan.pairs,
        "window_s": plan.window,
        "budgets": rows,
    }


def _budgets(text: str) -> list[float | None]:
    """'1.1,1.25,off' -> [1.1, 1.25, None]."""
    out: list[float | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "off":
            out.append(None)
            continue
        value = float(item)
        if value <= 1.0:
            raise argparse.ArgumentTypeError(f"a budget must be above 1.0 (got {item})")
        out.append(value)
    return out


if __name__ == "__main__":
    sys.exit(main())
