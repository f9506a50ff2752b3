"""Start a flexserve server as a subprocess for a benchmark, and read its /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """`python -m flexserve.cli serve ...` in its own session, with a throwaway data dir."""

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str],
        *,
        port: int | None = None,
        keep_dir: bool = False,
        python: str = sys.executable,
    ) -> None:
        self.port = port or free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="flexserve-bench-"))
        self.log_path = self.data_dir / "server.log"
        self.keep_dir = keep_dir
        self.cmd = [
            python,
            "-m",
            "flexserve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *args,
        ]
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self.keep_dir:
            print(f"server data dir kept: {self.data_dir}", file=sys.stderr)
        else:  # errors carry the log's tail; the dir also holds the key `serve` printed
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as resp:
                    body: dict[str, Any] = json.loads(resp.read())
                    # /healthz lists every model; the benchmarks serve one
                    return {"model": next(iter(body["models"])), **body}
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # Never echo the first API key that `serve` prints once.
        text = re.sub(r"fs-[A-Za-z0-9_\-]+", "fs-…", text)
        return "\n".join(text.splitlines()[-lines:])

    def metrics(self) -> tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """(monotonic time at the middle of the scrape, {(name, labels): value})."""
        t0 = time.monotonic()
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        t1 = time.monotonic()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match:
                labels = tuple(sorted(_LABEL.findall(match.group(2) or "")))
                out[(match.group(1), labels)] = float(match.group(3))
        return (t0 + t1) / 2, out


def metric(
    sample: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum over every sample of `name` that has `labels` (others, e.g. `model`, any)."""
    wanted = set(labels.items())
    return sum(
        value for (found, have), value in sample.items() if found == name and wanted <= set(have)
    )
