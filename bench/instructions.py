"""What a request costs flexserve, in CPU instructions: a measure this noisy box repeats.

bench/overhead.py times requests, and on this shared 2-core box its req/s moves by
±15 % from one minute to the next, for the same build: a 5 % change cannot be seen
there. Instructions do not move with the box's load. Each target runs under valgrind's
callgrind (which counts every instruction its process runs, all threads); after a
warm-up its counters are zeroed, one client sends `--requests` requests on one kept-alive
connection, one at a time, and the count is read. The figure is instructions per
request, of the whole server process (HTTP, validation, scheduling, the upstream call,
billing), against the same zero-delay fake upstream as bench/overhead.py.

Targets: flexserve in front of the fake (JSON and streamed answers of one token, or of
`--tokens`: what each streamed token costs), a
baseline build given by `--baseline-python` (JSON and streamed, same run), and
bench/_passthrough.py (the least a Python gateway on the same server and client costs:
a floor, not a competitor). One request at a time: what is counted is a request's own
work; a server under load batches some of it (the scheduler's steps, ledger commits)
and costs a little less per request.

Slow (valgrind runs the process about 50 times slower): about a minute per target.
The last line is JSON: `instructions_per_request` (JSON), `..._stream`, and with a
baseline `baseline_*` and `over_baseline` (this build's count over the baseline's: below
1 is cheaper), and `passthrough_instructions_per_request`, `share_of_passthrough`.

    .venv/bin/python bench/instructions.py
    .venv/bin/python bench/instructions.py --baseline-python /path/to/other/venv/bin/python
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from _server import free_port
from overhead import KEY, ZERO_DELAY, body, fake_upstream, process

HERE = Path(__file__).resolve().parent
READY_SECONDS = 600
"""Start-up under valgrind (imports, migrations) takes a minute or more."""


def valgrind(out: Path) -> list[str]:
    # Children traced: a baseline "python" may be a wrapper script that execs Python.
    return ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}"]


@contextmanager
def flexserve(python: str, upstream: str, work: Path, name: str) -> Iterator[tuple[int, int]]:
    """flexserve under callgrind: its port and pid."""
    port = free_port()
    data = work / name
    data.mkdir()
    cmd = [
        *valgrind(work / f"{name}.%p.cg"),
        python,
        *("-m", "flexserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--data-dir", str(data), "--log-level", "warning", "--upstream", upstream + "/v1"),
    ]
    env = {**ZERO_DELAY, "FLEXSERVE_API_KEYS": json.dumps({KEY: "bench"})}
    with _traced(cmd, env, port, work / f"{name}.log") as pid:
        yield port, pid


@contextmanager
def passthrough(upstream: str, work: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    cmd = [*valgrind(work / "passthrough.%p.cg"), sys.executable, str(HERE / "_passthrough.py")]
    cmd += ["--port", str(port), "--upstream", upstream]
    with _traced(cmd, {}, port, work / "passthrough.log") as pid:
        yield port, pid


@contextmanager
def _traced(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[int]:
    ready = f"http://127.0.0.1:{port}/healthz"
    with process(cmd, {**os.environ, **env}, ready, log, READY_SECONDS) as proc:
        yield proc.pid  # exec keeps the pid: the wrapper's is Python's


def send(port: int, count: int, stream: bool, tokens: int = 1) -> None:
    """`count` chat requests of `tokens` tokens, one at a time on one connection."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    payload = body(stream, tokens)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for _ in range(count):
        connection.request("POST", "/v1/chat/completions", payload, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"port {port}: status {response.status}")
    connection.close()


def count(pid: int, work: Path, port: int, args: argparse.Namespace, stream: bool) -> float:
    """Instructions per request, over `args.requests` requests after a warm-up."""
    send(port, args.warmup, stream, args.tokens)
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    send(port, args.requests, stream, args.tokens)
    before = set(work.glob("*.cg*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    dumps = sorted(set(work.glob(f"*.{pid}.cg.*")) - before)
    if not dumps:
        raise RuntimeError(f"pid {pid}: callgrind wrote no dump")
    text = dumps[-1].read_text(errors="replace")
    summary = re.search(r"^summary: (\d+)", text, re.MULTILINE)
    if summary is None:
        raise RuntimeError(f"{dumps[-1]}: no summary line")
    return int(summary.group(1)) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="counted, per target")
    parser.add_argument("--warmup", type=int, default=200, help="sent first, not counted")
    parser.add_argument("--baseline-python", help="also count this Python's flexserve")
    parser.add_argument("--flexserve-python", default=sys.executable)
    parser.add_argument("--no-passthrough", action="store_true")
    parser.add_argument(
        "--tokens", type=int, default=1, help="answer length (the fake streams one per event)"
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install -y valgrind)")
    work = Path(tempfile.mkdtemp(prefix="flexserve-instructions-"))
    builds = {"flexserve": args.flexserve_python}
    if args.baseline_python:
        builds["baseline"] = args.baseline_python
    results: dict[str, float] = {}
    try:
        measure_all(builds, work, args, results)
    finally:  # callgrind's files are large
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary(results, args.requests)))


def measure_all(
    builds: dict[str, str], work: Path, args: argparse.Namespace, results: dict[str, float]
) -> None:
    with ExitStack() as stack:
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        stack.enter_context(fake_upstream(upstream_port, work))
        for name, python in builds.items():
            with flexserve(python, upstream, work, name) as (port, pid):
                for stream in (False, True):
                    key = name + ("-stream" if stream else "")
                    results[key] = count(pid, work, port, args, stream)
                    print(f"{key:18s} {results[key] / 1e6:8.3f} M instructions/request")
        if not args.no_passthrough:
            with passthrough(upstream, work) as (port, pid):
                results["passthrough"] = count(pid, work, port, args, False)
                print(f"{'passthrough':18s} {results['passthrough'] / 1e6:8.3f} M")


def summary(results: dict[str, float], requests: int) -> dict[str, float | int]:
    out: dict[str, float | int] = {"requests": requests}
    names = {
        "flexserve": "instructions_per_request",
        "flexserve-stream": "instructions_per_request_stream",
        "baseline": "baseline_instructions_per_request",
        "baseline-stream": "baseline_instructions_per_request_stream",
        "passthrough": "passthrough_instructions_per_request",
    }
    for target, value in results.items():
        out[names[target]] = round(value)
    if "baseline" in results:
        out["over_baseline"] = round(results["flexserve"] / results["baseline"], 4)
        stream = results["flexserve-stream"] / results["baseline-stream"]
        out["over_baseline_stream"] = round(stream, 4)
    if "passthrough" in results:
        out["share_of_passthrough"] = round(results["flexserve"] / results["passthrough"], 3)
    return out


if __name__ == "__main__":
    main()
