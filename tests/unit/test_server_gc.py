"""The served process tunes its garbage collector once started (bench/RESULTS.md: full
collections over a deep flex backlog paused every interactive stream)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexserve.api import create_app
from flexserve.api import server as server_module
from flexserve.api.server import GC_THRESHOLDS, build_server, tune_garbage_collector
from tests.conftest import free_port, make_settings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tuning_freezes_what_exists_and_raises_the_thresholds(restore_gc: None) -> None:
    gc.unfreeze()
    built_at_start_up = [object() for _ in range(10)]
    tune_garbage_collector()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() >= len(built_at_start_up)


def test_the_server_tunes_after_its_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_gc: None
) -> None:
    tuned: list[bool] = []
    monkeypatch.setattr(server_module, "tune_garbage_collector", lambda: tuned.append(True))
    settings = make_settings(tmp_path, port=free_port())
    server = build_server(create_app(settings), settings, "warning")

    async def start_and_stop() -> None:
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup()
        assert server.started and tuned == [True]  # after the lifespan and the sockets
        await server.shutdown()

    asyncio.run(start_and_stop())


@pytest.mark.parametrize(
    ("level", "shown"), [("warning", False), ("error", False), ("info", True), ("trace", True)]
)
def test_the_access_log_is_on_exactly_when_its_lines_would_show(
    tmp_path: Path, level: str, shown: bool
) -> None:
    """Off above info: uvicorn builds each line's fields before the logger drops it."""
    settings = make_settings(tmp_path, port=free_port())
    server = build_server(create_app(settings), settings, level)
    assert server.config.access_log is shown
