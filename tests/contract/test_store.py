"""One contract, every Store: in-memory fake, SQLite file, PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from flexserve.keys import hash_key, make_key
from flexserve.store import LedgerRow, MemoryStore, SqlStore, Store

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_available() -> bool:
    engine = create_engine(POSTGRES)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception:
        return False
    finally:
        engine.dispose()
    return True


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        sql = SqlStore(f"sqlite:///{tmp_path / 'contract.db'}")
        sql.migrate()
        yield sql
        sql.close()
        return
    if not _postgres_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    schema = "contract_" + uuid.uuid4().hex[:8]
    admin = create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(text(f"create schema {schema}"))
    pg = SqlStore(f"{POSTGRES}?options=-csearch_path%3D{schema}")
    pg.migrate()
    yield pg
    pg.close()
    with admin.begin() as conn:
        conn.execute(text(f"drop schema {schema} cascade"))
    admin.dispose()


def row(request_id: str, tenant: str = "t1", tier: str = "flex", created: float = 1.0) -> LedgerRow:
    return LedgerRow(
        request_id=request_id,
        tenant=tenant,
        model="m",
        tier=tier,  # type: ignore[arg-type]
        input_tokens=10,
        cached_input_tokens=0,
        output_tokens=20,
        cost_nanos=500,
        list_cost_nanos=1000,
        outcome="completed",
        preemptions=1,
        created_at=created,
    )


def test_migrate_is_idempotent(store: Store) -> None:
    store.migrate()
    store.migrate()
    assert store.list_keys() == []


def test_keys_are_found_by_hash_only(store: Store) -> None:
    new = make_key("acme")
    store.add_key(new.record)
    found = store.find_key(hash_key(new.secret))
    assert found == new.record
    assert found is not None and new.secret not in (found.key_hash, found.prefix)
    assert store.find_key(hash_key("fs-other")) is None


def test_duplicate_key_hash_is_refused(store: Store) -> None:
    new = make_key("acme", secret="fs-same")
    store.add_key(new.record)
    with pytest.raises(Exception):  # noqa: B017 - each store raises its own kind
        store.add_key(make_key("evil", secret="fs-same").record)


def test_revoke_and_list_per_tenant(store: Store) -> None:
    a, b = make_key("acme"), make_key("globex")
    store.add_key(a.record)
    store.add_key(b.record)
    assert [k.tenant for k in store.list_keys("acme")] == ["acme"]
    assert store.revoke_key(a.record.key_id)
    assert not store.revoke_key("key_missing")
    found = store.find_key(a.record.key_hash)
    assert found is not None and found.revoked


def test_a_request_is_billed_once(store: Store) -> None:
    assert store.record(row("req_1"))
    assert not store.record(row("req_1"))
    assert [r.request_id for r in store.ledger("t1")] == ["req_1"]


def test_usage_groups_per_tier_and_never_crosses_tenants(store: Store) -> None:
    store.record(row("a", tier="flex", created=1.0))
    store.record(row("b", tier="flex", created=2.0))
    store.record(row("c", tier="default", created=3.0))
    store.record(row("d", tenant="t2", tier="default"))
    usage = {u.tier: u for u in store.usage("t1")}
    assert usage["flex"].requests == 2 and usage["flex"].output_tokens == 40
    assert usage["flex"].cost_nanos == 1000 and usage["flex"].list_cost_nanos == 2000
    assert usage["default"].requests == 1
    assert [u.tier for u in store.usage("t1", since=2.5)] == ["default"]
    assert [r.request_id for r in store.ledger("t2")] == ["d"]
