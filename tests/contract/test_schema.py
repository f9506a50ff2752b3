"""One source of truth for the schema: the Alembic migrations build exactly what
store/schema.py declares, on SQLite and on PostgreSQL; replicas migrating one fresh
PostgreSQL schema at once take turns."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from flexserve.store import SqlStore
from flexserve.store.schema import metadata
from tests.pg import POSTGRES, fresh_schema, in_schema


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'schema.db'}"
        return
    with fresh_schema() as schema:
        yield in_schema(POSTGRES, schema)


def test_migrations_build_exactly_the_declared_schema(database_url: str) -> None:
    store = SqlStore(database_url)
    store.migrate()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, metadata)
    store.close()
    assert differences == []


def _migrate(url: str, start: Barrier, failures: Queue[str]) -> None:
    """One replica starting: in its own process, as replicas are."""
    store = SqlStore(url)
    start.wait()
    try:
        store.migrate()
    except Exception as error:
        failures.put(repr(error))
    finally:
        store.close()


@pytest.mark.postgres
def test_replicas_migrating_a_fresh_schema_at_once_both_succeed() -> None:
    replicas = 3
    spawn = multiprocessing.get_context("spawn")
    with fresh_schema() as schema:
        url = in_schema(POSTGRES, schema)
        start, failures = spawn.Barrier(replicas), spawn.Queue()
        processes = [
            spawn.Process(target=_migrate, args=(url, start, failures)) for _ in range(replicas)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [process.exitcode for process in processes] == [0] * replicas
        assert failures.empty()
        store = SqlStore(url)
        assert store.list_keys() == []
        store.close()
