"""Settings: every field documented and bounded; bad values refused at load, by name."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flexserve.config import (
    EmbeddedSettings,
    InvalidSettings,
    ModelPrice,
    SchedulerSettings,
    Settings,
    SimulatedSettings,
    TierPrice,
    load_settings,
)

README = Path(__file__).parents[2] / "README.md"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLEXSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "model",
    [Settings, SchedulerSettings, SimulatedSettings, EmbeddedSettings, ModelPrice, TierPrice],
)
def test_every_setting_has_a_docstring(model: type[BaseModel]) -> None:
    undocumented = [name for name, f in model.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"slots": 0}, "slots"),
        ({"port": 70000}, "port"),
        ({"slots": 2, "scheduler": {"interactive_reserve": 2}}, "scheduler.interactive_reserve"),
        ({"scheduler": {"interactive_reserve": -1}}, "scheduler.interactive_reserve"),
        ({"scheduler": {"flex_width_when_busy": -1}}, "scheduler.flex_width_when_busy"),
        ({"scheduler": {"rate_window": 0}}, "scheduler.rate_window"),
        ({"scheduler": {"rate_smoothing": 1.5}}, "scheduler.rate_smoothing"),
        ({"scheduler": {"flex_max_wait": -1}}, "scheduler.flex_max_wait"),
        ({"scheduler": {"flex_queue_max_jobs": 0}}, "scheduler.flex_queue_max_jobs"),
        ({"scheduler": {"cold_start_tokens_per_slot_second": 0}}, "cold_start_tokens"),
        ({"scheduler": {"default_max_tokens": 0}}, "scheduler.default_max_tokens"),
        ({"paused_heartbeat": 0}, "paused_heartbeat"),
        ({"stall_timeout": 0}, "stall_timeout"),
        ({"shutdown_grace": -1}, "shutdown_grace"),
        ({"header_read_timeout": 0}, "header_read_timeout"),
        ({"body_read_timeout": -1}, "body_read_timeout"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"prices": {"m": {"input": -0.1}}}, "prices.m.input"),
        ({"prices": {"m": {"multipliers": {"flex": -1}}}}, "prices.m.multipliers.flex"),
        ({"prices": {"m": {"multipliers": {"cheap": 1}}}}, "prices.m.multipliers.cheap"),
        ({"simulated": {"tpot_ms": -1}}, "simulated.tpot_ms"),
        ({"embedded": {"background_prefill_chunk": 512}}, "background_prefill_chunk"),
        ({"embedded": {"threads": 0}}, "embedded.threads"),
        ({"backend": "gpu"}, "backend"),
        ({"schedular": {}}, "schedular"),
        ({"scheduler": {"flex_max_wiat": 3}}, "scheduler.flex_max_wiat"),
        ({"database_url": "not a url"}, "database_url"),
        ({"backend": "embedded", "embedded": {"model_path": "/nowhere.gguf"}}, "model_path"),
    ],
)
def test_a_bad_setting_is_refused_at_load_naming_it(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidSettings) as refused:
        load_settings(None, **overrides)
    message = str(refused.value)
    assert named in message and "\n" not in message


def test_a_bad_environment_variable_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXSERVE_SCHEDULER__RATE_WINDOW", "0")
    with pytest.raises(InvalidSettings, match=r"scheduler\.rate_window"):
        load_settings(None)
    monkeypatch.setenv("FLEXSERVE_SCHEDULER__RATE_WINDOW", "2")
    monkeypatch.setenv("FLEXSERVE_API_KEYS", "not json")
    with pytest.raises(InvalidSettings, match="api_keys"):
        load_settings(None)


def test_a_bad_file_is_refused_naming_the_file_or_the_setting(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("slots = \n")
    with pytest.raises(InvalidSettings, match=r"broken\.toml"):
        load_settings(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text("[scheduler]\nrate_windw = 3\n")
    with pytest.raises(InvalidSettings, match=r"scheduler\.rate_windw"):
        load_settings(typo)


def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "flexserve.toml"
    config.write_text(
        'slots = 3\nmodel_name = "from-file"\n'
        "[scheduler]\nflex_max_wait = 30\nrate_window = 5\ninteractive_reserve = 1\n"
    )
    monkeypatch.setenv("FLEXSERVE_SLOTS", "6")
    monkeypatch.setenv("FLEXSERVE_SCHEDULER__RATE_WINDOW", "7")
    settings = load_settings(config, slots=5, scheduler={"interactive_reserve": 2}, host=None)
    assert settings.slots == 5  # flag over environment over file
    assert settings.model_name == "from-file"  # file over default
    assert settings.host == "127.0.0.1"  # a flag not given (None) leaves the rest
    # Nested tables merge key by key across the sources.
    assert settings.scheduler.interactive_reserve == 2  # flag
    assert settings.scheduler.rate_window == 7  # environment
    assert settings.scheduler.flex_max_wait == 30  # file
    assert settings.scheduler.default_max_tokens == 256  # default


def test_the_readme_config_example_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", README.read_text(), re.DOTALL)
    assert example is not None
    config = tmp_path / "flexserve.toml"
    config.write_text(example.group(1))
    settings = load_settings(config)
    assert settings.scheduler.flex_width_when_busy == 2
