"""The command line: keys are printed once and stored hashed; serve says what it runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flexserve.api import server
from flexserve.backends import model_files
from flexserve.cli import main
from flexserve.config import Settings
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
    served: list[tuple[Any, Settings]] = []
    monkeypatch.setattr(server, "run_server", fake_run_server(served))
    args = ["serve", "--data-dir", str(tmp_path), "--port", "8765", "--backend", "simulated"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0
    assert "shown only once" in first.output and "shown only once" not in second.output
    assert "simulated backend" in first.output
    assert len(stored_hashes(tmp_path)) == 1
    settings = served[0][1]
    assert (settings.host, settings.port) == ("127.0.0.1", 8765)


def fake_run_server(served: list[tuple[Any, Settings]], status: int = 0) -> Any:
    def run_server(app: Any, settings: Settings, log_level: str) -> int:
        served.append((app, settings))
        return status

    return run_server


def test_config_file_and_flags_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[Any, Settings]] = []
    monkeypatch.setattr(server, "run_server", fake_run_server(served))
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
    state = served[0][0].state.flexserve
    served_model = state.fleet.first
    assert served_model.backend.slots == 5 and served_model.name == "tiny"
    assert state.settings.scheduler.flex_max_wait == 30


def test_a_runtime_failure_is_a_non_zero_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "run_server", fake_run_server([], status=1))
    args = ["serve", "--data-dir", str(tmp_path), "--backend", "simulated"]
    assert CliRunner().invoke(main, args).exit_code == 1


@pytest.mark.parametrize(
    ("flags", "environment", "file", "named"),
    [
        (["--slots", "0"], {}, "", "slots"),
        ([], {"FLEXSERVE_SCHEDULER__RATE_WINDOW": "0"}, "", "scheduler.rate_window"),
        ([], {"FLEXSERVE_PAUSED_HEARTBEAT": "soon"}, "", "paused_heartbeat"),
        (["--slots", "2"], {}, "[scheduler]\ninteractive_reserve = 2\n", "interactive_reserve"),
        ([], {}, "[prices.m]\noutput = -1\n", "prices.m.output"),
        ([], {}, "slots = [\n", "flexserve.toml"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_the_setting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    environment: dict[str, str],
    file: str,
    named: str,
) -> None:
    monkeypatch.setattr(server, "run_server", fake_run_server([]))
    config = tmp_path / "flexserve.toml"
    config.write_text(file)
    args = ["serve", "--data-dir", str(tmp_path), "--config", str(config), *flags]
    result = CliRunner(env=environment).invoke(main, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid settings" in lines[0] and named in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "flexserve.db").exists()  # nothing written before the check


def test_a_missing_default_model_exits_2_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_files, "DEFAULT_MODEL_PACKAGE", "flexserve_no_such_model_package")
    monkeypatch.setattr(server, "run_server", fake_run_server([]))
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path)])  # embedded
    assert result.exit_code == 2
    assert "embedded.model_path" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "flexserve.db").exists()


def test_a_bad_flag_value_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    args = ["serve", "--data-dir", str(tmp_path), "--log-level", "loud"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--log-level" in result.stderr
    assert not (tmp_path / "flexserve.db").exists()
