"""`flexserve serve` as a real process (signals, exit status, sockets), for tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import KEY, free_port

MODEL = "smollm2-135m"

START_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        pairs = (f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    return json.dumps(value)


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Top-level keys, with dict values written as inline tables."""
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items()))
    return path


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    port: int
    data_dir: Path
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def wait_healthy(self) -> None:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited at start:\n{self.log.read_text()}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server never became healthy")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def exit_status(self) -> int:
        return self.process.wait(timeout=EXIT_TIMEOUT)

    def headers(self, key: str = KEY) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def metric(self, name: str) -> float:
        """A metric's value, e.g. `flexserve_queued_jobs{tier="flex"}`."""
        text = httpx.get(self.base_url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no metric {name}")

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll (not a timing assertion: fails only if it never happens)."""
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"condition never became true\n{self.log.read_text()}")
            time.sleep(0.02)


def start_server(
    tmp_path: Path, settings: dict[str, Any], *, python_prelude: str = ""
) -> ServerProcess:
    """`flexserve serve --backend simulated --config ...` in a child process.

    `python_prelude` runs in the child before the CLI (to inject a fault).
    """
    port = free_port()
    config = write_config(tmp_path / "flexserve.toml", {"api_keys": {KEY: "tenant-a"}, **settings})
    script = f"{python_prelude}\nimport sys\nfrom flexserve.cli import main\nmain(sys.argv[1:])\n"
    args = ["serve", "--backend", "simulated", "--port", str(port), "--data-dir", str(tmp_path)]
    args += ["--config", str(config), "--log-level", "warning"]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", script, *args], stdout=out, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", port, tmp_path, log)
    try:
        server.wait_healthy()
    except BaseException:
        process.kill()
        process.wait()
        raise
    return server
