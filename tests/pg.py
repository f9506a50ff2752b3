"""The real PostgreSQL at 127.0.0.1:5432 (database `test`, trust auth), one fresh schema
per test so that tests never see each other's rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    engine = create_engine(POSTGRES)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception:
        return False
    finally:
        engine.dispose()
    return True


def in_schema(url: str, schema: str) -> str:
    return f"{url}?options=-csearch_path%3D{schema}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new empty schema's name (skips the test without PostgreSQL); dropped after."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(text(f"create schema {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"drop schema {schema} cascade"))
        admin.dispose()
