"""`flexserve batch ...` run for real against a real server (simulated backend): submit and
watch to the end, status, list, cancel, results, the server's refusals as one line, the
standard OPENAI_* environment variables in a separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner, Result

from flexserve.cli import main
from flexserve.store.batch_sql import BatchStore
from tests.conftest import KEY, OTHER_KEY, RunningServer, free_port

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"
FAST = {"ttft_ms": 1, "tpot_ms": 1, "natural_output_tokens": 6}
SLOW = {"ttft_ms": 1, "tpot_ms": 20, "natural_output_tokens": 10}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def write_requests(path: Path, count: int) -> Path:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}]},
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(item) + "\n" for item in lines))
    return path


def run(server: RunningServer, *args: str, key: str = KEY, **env: str) -> Result:
    """One `flexserve batch ...` command, as the user types it, with this server."""
    connection = ["--base-url", server.url, "--api-key", key]
    return CliRunner().invoke(main, ["batch", *args, *connection], env=env)


def batch_store(server: RunningServer) -> BatchStore:
    assert server.state.batches is not None
    return server.state.batches.store


def custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def test_submit_wait_shows_progress_then_downloads_every_result_once(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(slots=2, simulated=FAST)
    requests = write_requests(tmp_path / "requests.jsonl", 12)
    out = tmp_path / "results"
    args = ["--wait", "--interval", "0.05", "--out", str(out), "--metadata", "job=nightly"]
    result = run(server, "submit", str(requests), *args)
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.splitlines()[0]
    assert batch_id.startswith("batch-")
    assert f"{batch_id} completed: 12/12 completed, 0 failed" in result.stdout
    assert "at the default tier: saved $0.0000" in result.stdout
    assert f"submitted requests.jsonl as {batch_id}: 12 requests" in result.stderr
    # Not a terminal: a line per change, the last one with every count.
    assert f"{batch_id} completed: 12/12 completed, 0 failed, cost $" in result.stderr
    assert sorted(custom_ids(out / f"{batch_id}_output.jsonl")) == sorted(
        f"req-{i}" for i in range(12)
    )
    assert not (out / f"{batch_id}_errors.jsonl").exists()
    shown = json.loads(run(server, "status", batch_id, "--json").stdout)
    assert shown["metadata"] == {"job": "nightly"}
    assert shown["endpoint"] == "/v1/chat/completions"  # from the file's first line


def test_on_a_terminal_the_live_bar_shows_the_counts_and_cost(serve: Serve, tmp_path: Path) -> None:
    server = serve(slots=2, simulated=FAST)
    requests = write_requests(tmp_path / "requests.jsonl", 8)
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "TERM": "xterm", "COLUMNS": "160"}
    result = run(server, "submit", str(requests), "--wait", "--interval", "0.05", **terminal)
    assert result.exit_code == 0, result.output
    frames = ANSI.sub("", result.stderr).split("\r")
    last = frames[-1]
    assert "━" in last  # the bar itself, redrawn in place (a log gets plain lines)
    assert "completed" in last and "8/8" in last and "0 failed" in last and "saved $" in last


def test_status_list_cancel_wait_and_results(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(slots=1, simulated=SLOW, batch={"in_flight_per_batch": 1})
    requests = write_requests(tmp_path / "requests.jsonl", 30)
    batch_id = run(server, "submit", str(requests)).stdout.strip()
    server.wait_until(lambda: batch_store(server).get_batch(batch_id, "tenant-a").completed >= 2)  # type: ignore[union-attr]

    status = run(server, "status", batch_id)
    assert status.exit_code == 0 and "in_progress" in status.stdout
    assert re.search(r"requests\s+\d+/30 completed, 0 failed", status.stdout)
    listed = run(server, "list")
    assert re.search(rf"{batch_id}\s+in_progress\s+\d+/30", listed.stdout)

    early = run(server, "results", batch_id, "--out", str(tmp_path / "early"))
    assert early.exit_code == 1
    assert f"{batch_id} is in_progress: its files are written when it ends" in early.stderr

    cancelled = run(server, "cancel", batch_id)
    assert cancelled.exit_code == 0
    assert re.match(rf"{batch_id} (cancelling|cancelled): \d+/30 completed", cancelled.stdout)
    waited = run(server, "wait", batch_id, "--interval", "0.05")
    assert waited.exit_code == 5  # cancelled
    assert f"{batch_id} cancelled:" in waited.stdout

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # where `results` writes without --out
    result = run(server, "results", batch_id)
    assert result.exit_code == 0, result.output
    finished = custom_ids(here / f"{batch_id}_output.jsonl")
    ended = custom_ids(here / f"{batch_id}_errors.jsonl")
    assert finished and ended and not list(here.glob("*.part"))
    assert sorted(finished + ended) == sorted(f"req-{i}" for i in range(30))
    assert f"wrote {batch_id}_output.jsonl ({len(finished)} lines)" in result.stdout


def refused_file(tmp_path: Path) -> list[str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "method": "POST"\n')
    return ["submit", str(bad)]


@pytest.mark.parametrize(
    ("make_args", "key", "says"),
    [
        (refused_file, KEY, "the server answered 400: File file-"),
        (lambda _: ["status", "batch-nope"], KEY, "404: No such Batch object: batch-nope"),
        (lambda _: ["list"], "wrong", "401: Incorrect API key provided"),
        (
            lambda p: ["submit", str(write_requests(p / "r.jsonl", 1)), "--window", "1h"],
            KEY,
            "400: Invalid value for 'completion_window': '1h'",
        ),
    ],
)
def test_what_the_server_refuses_is_one_line_and_exit_1(
    serve: Serve, tmp_path: Path, make_args: Callable[[Path], list[str]], key: str, says: str
) -> None:
    server = serve()
    result = run(server, *make_args(tmp_path), key=key)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert "Traceback" not in result.output


def test_a_refused_file_says_which_line_and_is_not_left_on_the_server(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve()
    result = run(server, *refused_file(tmp_path))
    assert "cannot be a batch input: line 1: not valid JSON" in result.stderr
    with openai.OpenAI(base_url=server.url, api_key=KEY) as client:
        assert list(client.files.list()) == []


def test_a_server_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(main, ["batch", "list", "--base-url", url, "--api-key", KEY])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot reach {url}: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["list"], "no API key: pass --api-key or set OPENAI_API_KEY"),
        (["submit", "{file}", "--metadata", "job"], "'job' is not KEY=VALUE"),
        (["submit", "{file}", "--out", "x", "--api-key", KEY], "--out needs --wait"),
    ],
)
def test_bad_usage_is_exit_2_before_any_call(tmp_path: Path, args: list[str], says: str) -> None:
    file = str(write_requests(tmp_path / "r.jsonl", 1))
    args = [file if a == "{file}" else a for a in args]
    result = CliRunner().invoke(main, ["batch", *args], env={"OPENAI_API_KEY": None})  # type: ignore[dict-item]
    assert result.exit_code == 2 and says in result.stderr


def test_the_standard_environment_variables_pick_server_and_key(
    serve: Serve, tmp_path: Path
) -> None:
    """In a separate process, as a user runs it: OPENAI_BASE_URL and OPENAI_API_KEY only."""
    server = serve(simulated=FAST)
    requests = write_requests(tmp_path / "requests.jsonl", 3)

    def flexserve(*args: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
        env: dict[str, Any] = {**os.environ, "OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": key}
        return subprocess.run(
            [sys.executable, "-m", "flexserve.cli", "batch", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    submitted = flexserve("submit", str(requests), "--wait", "--interval", "0.05")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.splitlines()[0]
    assert f"{batch_id} completed: 3/3 completed" in submitted.stdout
    theirs = flexserve("list", key=OTHER_KEY)  # the key picks the tenant
    assert theirs.returncode == 0 and batch_id not in theirs.stdout


def test_a_batch_that_expires_while_watched_exits_4_with_what_it_finished(
    serve: Serve, tmp_path: Path
) -> None:
    windows = {"completion_windows": ["24h", "2s"], "in_flight_per_batch": 1}
    server = serve(slots=1, simulated=SLOW, batch=windows)
    requests = write_requests(tmp_path / "requests.jsonl", 200)
    out = tmp_path / "results"
    args = ["--window", "2s", "--wait", "--interval", "0.1", "--out", str(out)]
    result = run(server, "submit", str(requests), *args)
    assert result.exit_code == 4, result.output
    batch_id = result.stdout.splitlines()[0]
    assert f"{batch_id} expired: " in result.stdout
    finished = custom_ids(out / f"{batch_id}_output.jsonl")
    expired = custom_ids(out / f"{batch_id}_errors.jsonl")
    assert sorted(finished + expired) == sorted(f"req-{i}" for i in range(200))
