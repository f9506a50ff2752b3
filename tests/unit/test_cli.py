"""The command line: keys are printed once and stored hashed; serve says what it runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner

from flexserve.cli import main
from flexserve.keys import hash_key


def stored_hashes(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "flexserve.db") as db:
        return [row[0] for row in db.execute("select key_hash from api_keys")]


def test_keys_create_prints_a_key_stored_only_as_its_hash(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0
    secret = result.output.strip()
    assert secret.startswith("fs-") and len(secret) > 30
    assert stored_hashes(tmp_path) == [hash_key(secret)]
    db_bytes = (tmp_path / "flexserve.db").read_bytes()
    assert secret.encode() not in db_bytes


def test_serve_creates_and_prints_the_first_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    args = ["serve", "--data-dir", str(tmp_path), "--port", "8765", "--backend", "simulated"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0
    assert "shown only once" in first.output and "shown only once" not in second.output
    assert "simulated backend" in first.output
    assert len(stored_hashes(tmp_path)) == 1
    assert served[0][1] == {
        "host": "127.0.0.1",
        "port": 8765,
        "log_level": "info",
        "timeout_graceful_shutdown": 30,
    }


def test_config_file_and_flags_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    config = tmp_path / "flexserve.toml"
    config.write_text('slots = 3\nmodel_name = "tiny"\n[scheduler]\nflex_max_wait = 30\n')
    args = [
        "serve",
        "--config",
        str(config),
        "--data-dir",
        str(tmp_path),
        "--slots",
        "5",
        "--backend",
        "simulated",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    state = served[0].state.flexserve
    assert state.backend.slots == 5 and state.backend.model == "tiny"
    assert state.settings.scheduler.flex_max_wait == 30


def test_invalid_settings_are_a_clear_error_before_anything_is_written(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--slots", "0", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "invalid settings" in result.output and "slots" in result.output
    assert not (tmp_path / "flexserve.db").exists()
