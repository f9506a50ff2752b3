"""Fixtures for tests of the server as a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import ServerProcess, start_server


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(settings: dict[str, Any], python_prelude: str = "") -> ServerProcess:
        server = start_server(tmp_path, settings, python_prelude=python_prelude)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
