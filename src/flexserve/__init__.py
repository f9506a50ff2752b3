"""flexserve: a self-hosted OpenAI-compatible LLM server with service tiers."""

from flexserve.config import Settings, load_settings

__all__ = ["Settings", "__version__", "load_settings"]
__version__ = "0.1.0"
