"""Gateway overhead: what flexserve adds to a request, against direct and against LiteLLM.

Four targets, each its own process, all answering the same zero-delay chat request
(`max_tokens: 1`), measured in one run:

- direct: the zero-delay fake upstream (bench/_fake_upstream.py);
- flexserve: the default tier, non-streaming, and `flexserve-stream` streaming; with
  `--via upstream` in front of the fake (the `openai` backend), with `--via simulated`
  on its simulated backend at zero delay (no upstream hop: the request path alone);
- litellm: LiteLLM's proxy (one worker, a pinned release from bench/requirements-litellm.txt
  in a venv of its own) in front of the same fake;
- passthrough: the cheapest Python gateway (bench/_passthrough.py: the same uvicorn and
  aiohttp, relaying bytes with no key check, scheduling or billing) in front of the same
  fake. Not a competitor: it shows what the HTTP server, event loop and upstream client
  alone cost on this box, i.e. the least a gateway built this way can add.

The load generator is wrk, its own process: one connection for latency (p50/p99), then
`--connections` for throughput. Targets are interleaved round by round (`--rounds`), so
the box's noise falls on all of them alike; medians over rounds are reported, with the
spread (min..max). The last line is the summary JSON:
`added_p50_ms`/`added_p99_ms` (flexserve minus direct, one connection), `rps`,
`litellm_rps`, `rps_ratio`, and the passthrough's (`passthrough_added_p50_ms`,
`passthrough_rps`, `passthrough_rps_ratio`; `rps_share_of_passthrough`: flexserve's
requests/s over the passthrough's). With `--via upstream`, direct, flexserve and the
passthrough also relay streams of `--long-tokens` (64) tokens, one event each, all sent
by the fake at once: `*_long_tokens_per_s` (requests/s times the tokens) and
`long_tokens_share_of_passthrough` show what each streamed token costs a gateway.

flexserve gets `--slots` (64) above the connections, so that nothing queues for a slot:
what is measured is the request path, not the scheduler's admission. A baseline build
runs from another venv with `--flexserve-python`; the fake, wrk and LiteLLM stay the same.
Better on a noisy box, `--baseline-python` runs a baseline build beside it as `baseline`
targets in the same run, interleaved round by round (`baseline_*`, `*_over_baseline`).

    .venv/bin/python bench/overhead.py                  # flexserve in front of the fake
    .venv/bin/python bench/overhead.py --via simulated  # flexserve's own path alone
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _server import Server, free_port

HERE = Path(__file__).resolve().parent
KEY = "fs-overhead-bench-key-0000000000"
MODEL = "smollm2-135m"
LITELLM_VERSION = "1.80.17"
"""Never 1.82.7 or 1.82.8 (malicious releases)."""
LITELLM_VENV = Path.home() / ".cache" / "flexserve-bench" / f"litellm-{LITELLM_VERSION}"
LONG_NAMES = ("direct", "flexserve", "passthrough")
"""The targets that also relay long streams (`--long-tokens`)."""
ZERO_DELAY = {
    "FLEXSERVE_SIMULATED__TTFT_MS": "0",
    "FLEXSERVE_SIMULATED__TPOT_MS": "0",
    "FLEXSERVE_SIMULATED__TTFT_PER_PROMPT_TOKEN_MS": "0",
}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.body = '%(body)s'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"errors":%%d,"status_errors":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def body(stream: bool, max_tokens: int = 1) -> str:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    return json.dumps(request, separators=(",", ":"))


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    """One wrk run; its summary (latencies in ms), or an error if any request failed."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    result = json.loads(line.removeprefix("WRKJSON "))
    if result["errors"] or result["status_errors"]:
        raise RuntimeError(f"{url}: failed requests in wrk run: {result}")
    return {
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "rps": result["requests"] / (result["duration_us"] / 1e6),
    }


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s\n{log.read_text()[-3000:]}")


@contextmanager
def process(
    cmd: list[str], env: dict[str, str], ready: str, log: Path, ready_timeout: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` running until the block ends, once `ready` (a URL) answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(ready, ready_timeout, proc, log)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fake_upstream(port: int, work: Path) -> Any:
    cmd = [sys.executable, str(HERE / "_fake_upstream.py"), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    return process(cmd, dict(os.environ), base + "/healthz", work / "fake.log")


def passthrough(port: int, upstream: str, work: Path) -> Any:
    cmd = [sys.executable, str(HERE / "_passthrough.py"), "--port", str(port)]
    cmd += ["--upstream", upstream]
    base = f"http://127.0.0.1:{port}"
    return process(cmd, dict(os.environ), base + "/healthz", work / "passthrough.log")


def litellm_python() -> Path:
    """LiteLLM's own venv, made once from the pinned requirements (its dependencies clash
    with flexserve's, and it is a benchmark-only dependency)."""
    python = LITELLM_VENV / "bin" / "python"
    if not (LITELLM_VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-r", str(HERE / "requirements-litellm.txt")], check=True)
        (LITELLM_VENV / ".installed").touch()
    return python


def litellm(port: int, upstream: str, work: Path) -> Any:
    config = work / "litellm.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": "openai/bench",
                            "api_base": upstream + "/v1",
                            "api_key": "fake",
                        },
                    }
                ],
                "general_settings": {"master_key": KEY},
            }
        )
    )
    python = litellm_python()
    cmd = [str(python), "-m", "litellm.proxy.proxy_cli", "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return process(cmd, env, f"http://127.0.0.1:{port}/health/liveliness", work / "litellm.log")


@contextmanager
def flexserve(args: argparse.Namespace, upstream: str, python: str) -> Iterator[str]:
    env = {**ZERO_DELAY, "FLEXSERVE_API_KEYS": json.dumps({KEY: "bench"})}
    flags = ["--log-level", "warning", "--slots", str(args.slots)]
    if args.via == "upstream":
        flags += ["--upstream", upstream + "/v1"]
    else:
        flags += ["--backend", "simulated"]
    with Server(flags, env, python=python) as server:
        assert server.proc is not None  # any build: only that /healthz answers is used
        wait_ready(server.base + "/healthz", 60, server.proc, server.log_path)
        yield server.base


def median_spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--via", choices=["upstream", "simulated"], default="upstream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="throughput runs")
    parser.add_argument("--slots", type=int, default=64, help="flexserve's, > connections")
    parser.add_argument(
        "--flexserve-python",
        default=sys.executable,
        help="the Python that runs flexserve (another venv: a baseline build)",
    )
    parser.add_argument(
        "--baseline-python",
        help="also run this Python's flexserve (a baseline build) as `baseline` targets, "
        "interleaved with the others in the same run",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=64,
        help="also relay streams of this many tokens (direct, flexserve, passthrough); 0: not",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install -y wrk)")
    work = Path(tempfile.mkdtemp(prefix="flexserve-overhead-"))
    requests = {"json": body(False), "stream": body(True), "long": body(True, args.long_tokens)}
    scripts = {}
    for kind, request in requests.items():
        path = work / f"chat-{kind}.lua"
        path.write_text(WRK_SCRIPT % {"key": KEY, "body": request})
        scripts[kind] = path
    with ExitStack() as stack:
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        stack.enter_context(fake_upstream(upstream_port, work))
        gateway = stack.enter_context(flexserve(args, upstream, args.flexserve_python))
        relay_port = free_port()
        stack.enter_context(passthrough(relay_port, upstream, work))
        relay = f"http://127.0.0.1:{relay_port}"
        targets: dict[str, tuple[str, str]] = {
            "direct": (upstream, "json"),
            "direct-stream": (upstream, "stream"),
            "flexserve": (gateway, "json"),
            "flexserve-stream": (gateway, "stream"),
            "passthrough": (relay, "json"),
        }
        if args.baseline_python:
            base = stack.enter_context(flexserve(args, upstream, args.baseline_python))
            targets |= {"baseline": (base, "json"), "baseline-stream": (base, "stream")}
        if args.long_tokens > 0 and args.via == "upstream":  # what a stream's tokens cost
            bases = dict(zip(LONG_NAMES, (upstream, gateway, relay), strict=True))
            if args.baseline_python:
                bases["baseline"] = targets["baseline"][0]
            targets |= {f"{name}-long": (url, "long") for name, url in bases.items()}
        if not args.no_litellm:
            port = free_port()
            stack.enter_context(litellm(port, upstream, work))
            targets["litellm"] = (f"http://127.0.0.1:{port}", "json")
        results = measure(targets, scripts, args, lambda line: print(line, flush=True))
    shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def measure(
    targets: dict[str, tuple[str, str]],
    scripts: dict[str, Path],
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for base, kind in targets.values():  # warm-up: lazy imports, caches, connections
        wrk(base + "/v1/chat/completions", scripts[kind], 4, 1)
    for round_ in range(args.rounds):
        for name, (base, kind) in targets.items():
            url = base + "/v1/chat/completions"
            latency = wrk(url, scripts[kind], 1, args.seconds)
            load = wrk(url, scripts[kind], args.connections, args.seconds)
            row = {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"], "rps": load["rps"]}
            row["p50_ms_loaded"] = load["p50_ms"]
            results[name].append(row)
            say(
                f"round {round_ + 1} {name}: "
                + json.dumps({k: round(v, 3) for k, v in row.items()})
            )
    return results


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    table = {
        name: {field: median_spread([r[field] for r in rows]) for field in rows[0]}
        for name, rows in results.items()
    }
    print(json.dumps({"via": args.via, "connections": args.connections, "targets": table}))

    def med(name: str, field: str) -> float:
        return table[name][field]["median"]

    summary = {
        "via": args.via,
        "added_p50_ms": round(med("flexserve", "p50_ms") - med("direct", "p50_ms"), 3),
        "added_p99_ms": round(med("flexserve", "p99_ms") - med("direct", "p99_ms"), 3),
        "added_p50_ms_stream": round(
            med("flexserve-stream", "p50_ms") - med("direct-stream", "p50_ms"), 3
        ),
        "rps": round(med("flexserve", "rps"), 1),
        "rps_stream": round(med("flexserve-stream", "rps"), 1),
        "direct_rps": round(med("direct", "rps"), 1),
        "passthrough_added_p50_ms": round(
            med("passthrough", "p50_ms") - med("direct", "p50_ms"), 3
        ),
        "passthrough_rps": round(med("passthrough", "rps"), 1),
    }
    summary["rps_share_of_passthrough"] = round(summary["rps"] / summary["passthrough_rps"], 3)
    if "flexserve-long" in table:  # tokens relayed per second in streams of long_tokens
        tokens = {name: med(f"{name}-long", "rps") * args.long_tokens for name in LONG_NAMES}
        summary["long_tokens"] = args.long_tokens
        summary |= {f"{name}_long_tokens_per_s": round(tokens[name]) for name in LONG_NAMES}
        share = tokens["flexserve"] / tokens["passthrough"]
        summary["long_tokens_share_of_passthrough"] = round(share, 3)
    if "baseline" in table:
        summary |= _baseline_summary(table, args)
    if "litellm" in table:
        summary["litellm_rps"] = round(med("litellm", "rps"), 1)
        summary["rps_ratio"] = round(summary["rps"] / summary["litellm_rps"], 2)
        ratio = summary["passthrough_rps"] / summary["litellm_rps"]
        summary["passthrough_rps_ratio"] = round(ratio, 2)
    print(json.dumps(summary))


def _baseline_summary(
    table: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace
) -> dict[str, float]:
    """The baseline build's figures from the same run, and the new build's over them."""

    def med(name: str, field: str) -> float:
        return table[name][field]["median"]

    direct = med("direct", "p50_ms")
    summary = {
        "baseline_added_p50_ms": round(med("baseline", "p50_ms") - direct, 3),
        "baseline_added_p50_ms_stream": round(
            med("baseline-stream", "p50_ms") - med("direct-stream", "p50_ms"), 3
        ),
        "baseline_rps": round(med("baseline", "rps"), 1),
        "baseline_rps_stream": round(med("baseline-stream", "rps"), 1),
        "rps_over_baseline": round(med("flexserve", "rps") / med("baseline", "rps"), 3),
        "rps_stream_over_baseline": round(
            med("flexserve-stream", "rps") / med("baseline-stream", "rps"), 3
        ),
    }
    if "baseline-long" in table:
        tokens = med("baseline-long", "rps") * args.long_tokens
        summary["baseline_long_tokens_per_s"] = round(tokens)
        ratio = med("flexserve-long", "rps") / med("baseline-long", "rps")
        summary["long_tokens_over_baseline"] = round(ratio, 3)
    return summary


if __name__ == "__main__":
    main()
