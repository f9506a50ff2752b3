"""Models and pools in settings: the README's vLLM example loads and builds; every bad
pool setting stops the server at start with one line naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flexserve.backends import build_models
from flexserve.backends.pool import Pool
from flexserve.backends.upstream.backend import OpenAIBackend
from flexserve.config import (
    InvalidSettings,
    ModelSettings,
    PoolBackendSettings,
    load_settings,
)

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "vllm.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLEXSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("model", [ModelSettings, PoolBackendSettings])
def test_every_pool_setting_has_a_docstring(model: type[BaseModel]) -> None:
    assert [name for name, f in model.model_fields.items() if not f.description] == []


def test_the_readme_vllm_example_loads_into_a_pool_of_two_vllm_backends() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Put flexserve in front of your vLLM", 1)[1]
    shown = section.split("```toml\n", 1)[1].split("```", 1)[0]
    assert shown == EXAMPLE.read_text()  # the README shows the file the test loads
    settings = load_settings(EXAMPLE)
    built = build_models(settings)
    pool = built["qwen2.5-7b"]
    assert isinstance(pool, Pool) and pool.slots == 128 and pool.can_pause
    first, second = pool.members
    assert isinstance(first, OpenAIBackend) and isinstance(second, OpenAIBackend)
    assert (first.label, second.label) == ("gpu-0", "gpu-1")
    assert first.endpoint.upstream_model == "Qwen/Qwen2.5-7B-Instruct"
    assert first.endpoint.metrics_url == "http://127.0.0.1:8001/metrics"
    assert (first.capabilities.priority, first.capabilities.continuation) == ("vllm", "vllm")
    assert settings.price("qwen2.5-7b").input == 0.20


def openai_backend(**fields: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", **fields}


@pytest.mark.parametrize(
    ("models", "named"),
    [
        ({"m": {"backends": []}}, "models.m.backends"),
        ({"m": {"backends": [{"kind": "openai"}]}}, "base_url is required"),
        ({"m": {"backends": [openai_backend(base_url="127.0.0.1:8000")]}}, "http(s) URL"),
        ({"m": {"backends": [openai_backend(engine="tgi")]}}, "models.m.backends.0.engine"),
        ({"m": {"backends": [openai_backend(continuation="completions")]}}, "chat_template"),
        ({"m": {"backends": [openai_backend(api_key_env="FS_TEST_UNSET")]}}, "FS_TEST_UNSET"),
        ({"m": {"backends": [{"kind": "simulated", "base_url": "http://x/v1"}]}}, "base_url is"),
        ({"m": {"backends": [{"kind": "embedded"}, {"kind": "simulated"}]}}, "only backend"),
        ({"m": {"backends": [{"kind": "simulated"}], "tiers": ["fast"]}}, "models.m.tiers"),
        ({"m": {"backends": [{"kind": "simulated", "slots": 0}]}}, "slots"),
        (
            {"m": {"backends": [openai_backend(engine="sglang", continuation="vllm-tokens")]}},
            "'vllm-tokens' is for engine vllm or custom",
        ),
        (
            {
                "m": {
                    "backends": [
                        openai_backend(engine="vllm", continuation="vllm-tokens"),
                        openai_backend(engine="llamacpp", continuation="llamacpp-tokens"),
                    ]
                }
            },
            "cannot share a pool",
        ),
        (
            {"m": {"backends": [openai_backend(engine="vllm", batch_invariant=True)]}},
            "batch_invariant needs continuation 'vllm-tokens'",
        ),
        (
            {"m": {"backends": [openai_backend(engine="llamacpp", batch_invariant=True)]}},
            "llama.cpp has no batch-invariant mode",
        ),
        (
            {"m": {"backends": [{"kind": "simulated", "batch_invariant": True}]}},
            "batch_invariant is only for kind = 'openai'",
        ),
    ],
)
def test_a_bad_pool_setting_is_refused_at_start_by_name(models: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidSettings) as refused:
        load_settings(None, models=models)
    assert named in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_reserve_must_leave_flex_a_slot_in_every_pool() -> None:
    models = {"small": {"backends": [{"kind": "simulated", "slots": 1}]}}
    with pytest.raises(InvalidSettings, match="model small's slots"):
        load_settings(None, models=models, scheduler={"interactive_reserve": 1})


def test_upstream_and_models_are_one_or_the_other() -> None:
    models = {"m": {"backends": [{"kind": "simulated"}]}}
    with pytest.raises(InvalidSettings, match="either `upstream` or `models`"):
        load_settings(None, models=models, upstream="http://127.0.0.1:9/v1")
    with pytest.raises(InvalidSettings, match="upstream must be an http"):
        load_settings(None, upstream="localhost:9")


def test_an_upstream_that_does_not_answer_is_a_bad_setting_at_start() -> None:
    settings = load_settings(None, upstream="http://127.0.0.1:9/v1")  # nothing listens on 9
    with pytest.raises(InvalidSettings, match="cannot list models"):
        build_models(settings)


def test_engine_presets_can_be_overridden_one_capability_at_a_time() -> None:
    entry = PoolBackendSettings(kind="openai", base_url="http://h:1/v1", engine="vllm")
    assert entry.capabilities() == ("vllm", "vllm", False)
    custom = entry.model_copy(update={"continuation": "none", "service_tier_passthrough": True})
    assert custom.capabilities() == ("vllm", "none", True)
    openai = PoolBackendSettings(kind="openai", base_url="http://h:1/v1", engine="openai")
    assert openai.capabilities() == ("none", "none", True)
    assert openai.resolved_metrics_url() is None


def test_a_batch_invariant_vllm_promises_the_uninterrupted_answer_at_temperature_zero() -> None:
    """Declared by the operator (vLLM started with VLLM_BATCH_INVARIANT=1): /v1/models
    says a token-level resume gives the uninterrupted greedy answer; undeclared, it
    does not promise that."""
    fields = openai_backend(engine="vllm", continuation="vllm-tokens")
    declared = {"m": {"backends": [{**fields, "batch_invariant": True}]}}
    backend = build_models(load_settings(None, models=declared))["m"]
    assert isinstance(backend, OpenAIBackend) and backend.capabilities.batch_invariant
    promise = backend.capabilities.guarantee()
    assert "token-level resume is identical to the uninterrupted answer at temperature 0" in promise
    assert "text-level" in promise  # the fallbacks still say so
    plain = build_models(load_settings(None, models={"m": {"backends": [fields]}}))["m"]
    assert isinstance(plain, OpenAIBackend)
    assert "only on a batch-invariant engine" in plain.capabilities.guarantee()


def test_a_base_url_that_does_not_end_in_v1_is_served_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Some servers put their OpenAI routes elsewhere, so it is not refused; but the
    usual mistake (the server's root) is said at start, not found by failing requests."""
    root = {"m": {"backends": [openai_backend(base_url="http://user:secret@127.0.0.1:9")]}}
    build_models(load_settings(None, models=root))
    assert "backend 127.0.0.1:9: base_url does not end in /v1" in caplog.text
    assert "secret" not in caplog.text
    caplog.clear()
    build_models(load_settings(None, models={"m": {"backends": [openai_backend()]}}))
    assert "does not end in /v1" not in caplog.text
