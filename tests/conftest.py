"""Shared fixtures: a real flexserve server on a loopback port, in this process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from flexserve.api import create_app
from flexserve.api.state import AppState
from flexserve.config import Settings, load_settings

KEY = "fs-test-key-tenant-a"
OTHER_KEY = "fs-test-key-tenant-b"
ADMIN_KEY = "fs-test-admin-key"


@dataclass
class RunningServer:
    base_url: str
    settings: Settings
    state: AppState

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll server state (not a timing assertion: fails only if it never happens)."""
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError("condition never became true")
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "backend": "simulated",
        "slots": 2,
        "api_keys": {KEY: "tenant-a", OTHER_KEY: "tenant-b"},
        "admin_keys": [ADMIN_KEY],
        "simulated": {"ttft_ms": 5, "tpot_ms": 2, "natural_output_tokens": 12},
    }
    return load_settings(None, **{**base, **overrides})


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> RunningServer:
        settings = make_settings(tmp_path, **overrides)
        app = create_app(settings)
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return RunningServer(f"http://127.0.0.1:{port}", settings, app.state.flexserve)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def clients() -> Iterator[Callable[..., Any]]:
    """Official clients for a server (a RunningServer or a ServerProcess), closed at the
    end of the test: one left to the garbage collector is a ResourceWarning (an error)."""
    import openai

    made: list[openai.OpenAI] = []

    def make(server: Any, key: str = KEY) -> openai.OpenAI:
        url = getattr(server, "url", None) or server.base_url + "/v1"
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
