"""HTTP: the only package that knows about requests and responses."""

from flexserve.api.app import create_app, open_store

__all__ = ["create_app", "open_store"]
