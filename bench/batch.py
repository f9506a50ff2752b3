"""Batch API benchmark: does a big batch keep the slots busy without hurting interactive
latency, and do validation and finalization scale?

    .venv/bin/python bench/batch.py [--slots K] [--window S] [--pairs N] [--lines N]
                                    [--in-flight N] [--skip-memory] [--skip-finalize]

What it measures (each part against a baseline from the same run where there is one):

1. utilization and interactive TTFT: `flexserve serve` (simulated backend, K slots,
   a=50 ms, c=20 ms per token, 32-token answers) in a subprocess; a default-tier
   Poisson prober (streaming, open loop, ~40 % of capacity) in a process of its own
   (bench/_load.py, as bench/tiers.py). Windows alternate ABBA between `alone` (no batch
   running) and `batch` (a `--lines` batch running, submitted through /v1/files and
   /v1/batches; one batch serves two adjacent windows and is cancelled, and its cancel
   finished, before the next alone window). Both windows of a pair replay the same
   arrival offsets. Utilization of a batch window = delta
   `flexserve_backend_busy_slot_seconds_total` / (K x window). The p99 TTFT ratio is the
   median over pairs of p99(batch window) / p99(alone window).
2. validation: a fresh server per file; upload a 50,000-line file and a ~200 MB file
   (50,000 lines of ~4 KB) through /v1/files; lines/s of the upload (transfer, multipart,
   line checks, chunk storage) and the server process's memory growth: peak RSS
   (/proc/<pid>/status VmHWM) after the upload minus RSS before it.
3. finalize: a 50,000-line batch whose lines are all done (result rows of a realistic
   size, in a SQLite store in this process), finalized by the runner's own code path
   (`BatchRunner._finalize`: output file written from the rows, status moved): seconds.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _load
from _batch_parts import (
    KEY,
    MODEL,
    TOKENS,
    api,
    create_batch,
    measure_finalize,
    measure_upload,
    postgres_schema,
    upload,
    write_batch_file,
)
from _load import LoadConfig, Result, Target
from _server import Server, metric
from tiers import _collect, pct, poisson_offsets, spread

BUSY = "flexserve_backend_busy_slot_seconds_total"
QUEUED = "flexserve_queued_jobs"
A_MS, B_MS, C_MS = 50.0, 0.05, 20.0


@dataclass
class Window:
    label: str
    kind: str  # alone | batch
    pair: int
    t0: float
    t1: float
    busy: float
    queued_batch: tuple[float, float]
    done_lines: float  # batch lines finished during the window


def server_env(
    slots: int, in_flight: int, extra: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    args = ["--backend", "simulated", "--slots", str(slots), "--log-level", "warning"]
    args += ["--sim-ttft-ms", str(A_MS), "--sim-tpot-ms", str(C_MS)]
    env = {
        "FLEXSERVE_API_KEYS": json.dumps({KEY: "bench"}),
        "FLEXSERVE_SIMULATED__NATURAL_OUTPUT_TOKENS": str(TOKENS),
        "FLEXSERVE_SIMULATED__TTFT_PER_PROMPT_TOKEN_MS": str(B_MS),
        "FLEXSERVE_BATCH__IN_FLIGHT_PER_BATCH": str(in_flight),
        "FLEXSERVE_BATCH__IN_FLIGHT_TOTAL": str(max(in_flight, 64)),
        **extra,
    }
    return args, env


# ---- part 1: utilization and TTFT --------------------------------------------------------


class Run:
    def __init__(self, server: Server, target: Target, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        ctx = mp.get_context("spawn")
        self.cfg = LoadConfig(target, TOKENS, TOKENS)
        self.cmd, self.out = ctx.Queue(), ctx.Queue()
        self.inflight = ctx.RawValue("i", 0)
        self.prober = ctx.Process(
            target=_load.prober_main,
            args=(self.cfg, self.cmd, self.out, self.inflight),
            name="bench-prober",
        )
        self.windows: list[Window] = []
        self.incidents: list[str] = []
        self.batch_id: str | None = None
        self.cancel_seconds: list[float] = []
        self.file_id = ""

    def wait_prober_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.inflight.value > 0:
            if not self.prober.is_alive():
                raise RuntimeError("the prober died")
            if time.monotonic() > end:
                self.incidents.append(f"prober still had {self.inflight.value} in flight")
                return
            time.sleep(0.02)

    def batch_on(self) -> None:
        self.batch_id = create_batch(self.server.base, self.file_id)
        end = time.monotonic() + 60
        while metric(self.server.metrics()[1], BUSY) == 0 or not self._batch_running():
            if time.monotonic() > end:
                self.incidents.append("batch never started")
                break
            time.sleep(0.05)
        time.sleep(self.args.ramp)

    def _batch_running(self) -> bool:
        assert self.batch_id is not None
        got = api(self.server.base, "GET", f"/v1/batches/{self.batch_id}")
        return bool(got["request_counts"]["completed"] > 0)

    def batch_off(self) -> None:
        """Cancel the batch and wait until its cancel is finished (nothing of it left)."""
        assert self.batch_id is not None
        start = time.monotonic()
        api(self.server.base, "POST", f"/v1/batches/{self.batch_id}/cancel")
        end = start + 300
        while api(self.server.base, "GET", f"/v1/batches/{self.batch_id}")["status"] != "cancelled":
            if time.monotonic() > end:
                self.incidents.append("batch cancel did not finish in 300 s")
                break
            time.sleep(0.05)
        self.cancel_seconds.append(time.monotonic() - start)
        while metric(self.server.metrics()[1], QUEUED, tier="batch") > 0:
            time.sleep(0.05)
        self.batch_id = None

    def window(self, label: str, kind: str, pair: int, offsets: list[float]) -> None:
        t_start = time.monotonic() + 0.2
        self.cmd.put(("window", label, t_start, offsets))
        _sleep_until(t_start)
        t0, m0 = self.server.metrics()
        done0 = self._done()
        _sleep_until(t_start + self.args.window)
        t1, m1 = self.server.metrics()
        done1 = self._done()
        queued = (metric(m0, QUEUED, tier="batch"), metric(m1, QUEUED, tier="batch"))
        busy = metric(m1, BUSY) - metric(m0, BUSY)
        self.windows.append(Window(label, kind, pair, t0, t1, busy, queued, done1 - done0))

    def _done(self) -> float:
        if self.batch_id is None:
            return 0.0
        got = api(self.server.base, "GET", f"/v1/batches/{self.batch_id}")
        return float(got["request_counts"]["completed"] + got["request_counts"]["failed"])

    def run(self, rate: float) -> None:
        a = self.args
        rng = random.Random(a.seed)
        self.cmd.put(("window", "warmup", time.monotonic() + 0.1, poisson_offsets(rate, 2, rng)))
        time.sleep(2.5)
        self.wait_prober_idle(30)
        running = False
        for pair in range(a.pairs):
            offsets = poisson_offsets(rate, a.window, random.Random(a.seed * 1000 + pair))
            kinds = ("alone", "batch") if pair % 2 == 0 else ("batch", "alone")
            for kind in kinds:
                if kind == "alone" and running:
                    self.batch_off()
                    running = False
                elif kind == "batch" and not running:
                    self.batch_on()
                    running = True
                self.window(f"{kind}{pair}", kind, pair, offsets)
                self.wait_prober_idle(30)
        if running:
            self.batch_off()

    def finish(self) -> list[Result]:
        self.cmd.put(("stop",))
        results: list[Result] = _collect(self.out, self.prober, 120)
        self.prober.join(timeout=10)
        return results


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def p99_ttft(results: list[Result]) -> float:
    return pct([r.ttft for r in results if r.outcome == "ok" and r.ttft is not None], 0.99)


def utilization_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    srv_args, env = server_env(args.slots, args.in_flight, {})
    with Server(srv_args, env) as server:
        server.wait_healthy(30)
        model = MODEL
        path = workdir / "batch-10k.jsonl"
        write_batch_file(path, model, args.lines, max_tokens=args.batch_tokens)
        target = Target("127.0.0.1", server.port, model, KEY)
        per_request = (A_MS + B_MS * 40 + TOKENS * C_MS) / 1000.0
        capacity = args.slots / per_request
        rate = args.load * capacity
        run = Run(server, target, args)
        run.file_id = str(upload(server.base, path)["id"])
        run.prober.start()
        try:
            run.run(rate)
            results = run.finish()
        finally:
            if run.prober.is_alive():
                run.prober.terminate()
    by_label: dict[str, list[Result]] = {}
    for r in results:
        by_label.setdefault(r.label, []).append(r)
    print(
        f"utilization and TTFT: K={args.slots}, simulated a={A_MS:g} ms c={C_MS:g} ms, "
        f"{TOKENS}-token answers ({args.batch_tokens} for batch lines); default load "
        f"{args.load:.0%} of {capacity:.2f} req/s "
        f"(Poisson, streaming); batch of {args.lines} lines, in_flight_per_batch "
        f"{args.in_flight}"
    )
    print(
        f"  {'window':<8} {'n':>4} {'err':>3} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'util':>5} {'batch q':>8} {'lines':>6}"
    )
    for w in run.windows:
        rs = by_label.get(w.label, [])
        ttfts = [r.ttft for r in rs if r.outcome == "ok" and r.ttft is not None]
        util = w.busy / (args.slots * (w.t1 - w.t0))
        print(
            f"  {w.label:<8} {len(rs):>4} {sum(r.outcome != 'ok' for r in rs):>3} "
            f"{pct(ttfts, 0.5) * 1000:>9.1f} {pct(ttfts, 0.99) * 1000:>9.1f} {util:>5.3f} "
            f"{w.queued_batch[0]:>3.0f}-{w.queued_batch[1]:<4.0f} {w.done_lines:>6.0f}"
        )
    ratios = []
    for pair in range(args.pairs):
        alone = by_label.get(f"alone{pair}", [])
        batch = by_label.get(f"batch{pair}", [])
        if alone and batch:
            ratios.append(p99_ttft(batch) / p99_ttft(alone))
    batch_windows = [w for w in run.windows if w.kind == "batch"]
    busy = sum(w.busy for w in batch_windows)
    span = sum(args.slots * (w.t1 - w.t0) for w in batch_windows)
    utilization = busy / span if span else math.nan
    s = spread(ratios)
    errors = sum(r.outcome != "ok" for r in results)
    print(
        f"  p99 TTFT batch/alone: median {s['median']:.3f} (spread {s['min']:.3f}-"
        f"{s['max']:.3f}; pairs {', '.join(f'{v:.3f}' for v in ratios)})"
    )
    print(
        f"  utilization in batch windows {utilization:.3f}; default requests {len(results)}, "
        f"{errors} not ok; cancel took {', '.join(f'{c:.1f}' for c in run.cancel_seconds)} s"
    )
    for incident in run.incidents:
        print(f"    ! {incident}")
    return {
        "utilization": round(utilization, 4),
        "p99_ttft_ratio": round(s["median"], 4),
        "p99_ttft_ratios": [round(v, 4) for v in ratios],
        "utilization_per_window": [
            round(w.busy / (args.slots * (w.t1 - w.t0)), 4) for w in batch_windows
        ],
        "default_errors": errors,
        "cancel_s": [round(c, 2) for c in run.cancel_seconds],
        "batch_lines_per_window": [w.done_lines for w in batch_windows],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--load", type=float, default=0.40)
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--in-flight", type=int, default=16, help="batch.in_flight_per_batch")
    p.add_argument("--batch-tokens", type=int, default=TOKENS, help="max_tokens of batch lines")
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--postgres",
        metavar="URL",
        help="also finalize on this PostgreSQL (a fresh schema, dropped after), e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-finalize", action="store_true")
    p.add_argument("--skip-utilization", action="store_true")
    args = p.parse_args(argv)
    started = time.monotonic()
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flexserve-batch-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_memory:
            srv_args, env = server_env(args.slots, args.in_flight, {})
            small = workdir / "50k.jsonl"
            big = workdir / "200mb.jsonl"
            write_batch_file(small, MODEL, 50_000)
            write_batch_file(
                big, "smollm2-135m", 50_000, pad=3880
            )  # ~195 MiB, under the 200 MiB cap
            uploads = {
                "50k_lines": measure_upload(small, 50_000, srv_args, env),
                "200mb": measure_upload(big, 50_000, srv_args, env),
            }
            for name, got in uploads.items():
                print(
                    f"upload {name}: {got['bytes'] / 2**20:.1f} MB in {got['seconds']:.2f} s "
                    f"= {got['lines_per_s']:.0f} lines/s; server RSS {got['rss_before_mb']} MB "
                    f"before, peak growth {got['peak_growth_mb']} MB"
                )
            summary["validate_lines_per_s"] = uploads["50k_lines"]["lines_per_s"]
            summary["validate_peak_mb"] = max(u["peak_growth_mb"] for u in uploads.values())
            summary["uploads"] = uploads
        if not args.skip_finalize:
            fin = measure_finalize(50_000, workdir / "finalize")
            print(
                f"finalize (SQLite): {fin['lines']} done lines ({fin['result_mb']} MB of "
                f"results) -> output file {fin['output_mb']} MB in {fin['seconds']:.2f} s"
            )
            summary["finalize_s"] = fin["seconds"]
            if args.postgres:
                with postgres_schema(args.postgres) as url:
                    pg = measure_finalize(50_000, workdir / "finalize-pg", url)
                print(f"finalize (PostgreSQL): {pg['lines']} lines in {pg['seconds']:.2f} s")
                summary["finalize_postgres_s"] = pg["seconds"]
        if not args.skip_utilization:
            summary |= utilization_part(args, workdir)
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    summary["settings"] = {
        "slots": args.slots,
        "in_flight_per_batch": args.in_flight,
        "batch_tokens": args.batch_tokens,
    }
    first = ("utilization", "p99_ttft_ratio", "validate_lines_per_s", "validate_peak_mb")
    ordered = {k: summary[k] for k in (*first, "finalize_s") if k in summary}
    print(json.dumps(ordered | summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
