"""One contract, every Store: in-memory fake, SQLite file, PostgreSQL."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from flexserve.keys import DefaultTierNotAllowed, ensure_config_keys, hash_key, make_key
from flexserve.store import STORE_AWAY, LedgerRow, MemoryStore, SqlStore, Store
from tests.pg import POSTGRES, fresh_schema, in_schema


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
    with fresh_schema() as schema:
        pg = SqlStore(in_schema(POSTGRES, schema))
        pg.migrate()
        yield pg
        pg.close()


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


def test_a_batch_bills_each_request_once(store: Store) -> None:
    assert store.record(row("req_1"))
    batch = [row("req_2"), row("req_1"), row("req_3"), row("req_2")]
    assert store.record_many(batch) == [True, False, True, False]
    assert sorted(r.request_id for r in store.ledger("t1")) == ["req_1", "req_2", "req_3"]
    assert store.record_many([]) == []


def test_a_sql_batch_with_a_refused_row_stores_none_of_it(store: Store) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store has no transactions (its record_many says so)")
    refused = dataclasses.replace(row("req_bad"), tier=None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        store.record_many([row("req_1"), refused, row("req_2")])
    assert store.ledger("t1") == []


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


def test_usage_of_every_tenant_adds_them_up(store: Store) -> None:
    store.record(row("a", tier="flex", created=1.0))
    store.record(row("b", tenant="t2", tier="flex", created=2.0))
    store.record(row("c", tenant="t2", tier="default", created=3.0))
    assert {u.tier: u.requests for u in store.usage(None)} == {"flex": 2, "default": 1}
    assert {u.tier: u.requests for u in store.usage(None, since=1.5)} == {"flex": 1, "default": 1}


def test_a_row_that_breaks_another_constraint_is_not_taken_for_already_billed(
    store: Store,
) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the fake has no constraints to break")
    broken = dataclasses.replace(row("req_1"), tenant=None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        store.record(broken)
    assert store.record(row("req_1"))  # the request id was never billed


def test_update_key_replaces_its_fields(store: Store) -> None:
    new = make_key("acme")
    store.add_key(new.record)
    moved = dataclasses.replace(new.record, tenant="globex", requests_per_minute=7)
    store.update_key(moved)
    assert store.find_key(new.record.key_hash) == moved


def test_a_default_tier_outside_the_allowed_tiers_is_refused() -> None:
    with pytest.raises(DefaultTierNotAllowed):
        make_key("acme", default_tier="priority", allowed_tiers=("flex", "batch"))


def active_tenant(store: Store, secret: str) -> str | None:
    found = store.find_key(hash_key(secret))
    return None if found is None or found.revoked else found.tenant


def test_config_keys_are_reconciled_at_start_up(store: Store) -> None:
    created = make_key("acme")  # an admin-made key: config never touches it
    store.add_key(created.record)
    ensure_config_keys(store, {"fs-a": "acme", "fs-b": "globex"}, ["fs-admin"])
    assert active_tenant(store, "fs-a") == "acme"
    # next start: fs-a moved to globex, fs-b removed, fs-admin removed
    ensure_config_keys(store, {"fs-a": "globex"}, [])
    assert active_tenant(store, "fs-a") == "globex"
    assert active_tenant(store, "fs-b") is None
    assert active_tenant(store, "fs-admin") is None
    assert active_tenant(store, created.secret) == "acme"
    # and back again: a key named in config again works again
    ensure_config_keys(store, {"fs-a": "globex", "fs-b": "globex"}, [])
    assert active_tenant(store, "fs-b") == "globex"
    assert len(store.list_keys()) == 4


def test_replicas_reconciling_at_once_store_each_config_key_once(store: Store) -> None:
    keys = {f"fs-{i}": "acme" for i in range(20)}
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def replica() -> None:
        start.wait()
        try:
            ensure_config_keys(store, keys, [])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_keys()) == 20


def test_sqlite_waits_for_a_lock_only_its_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    migrated = SqlStore(f"sqlite:///{path}")
    migrated.migrate()
    migrated.close()
    waiter = SqlStore(f"sqlite:///{path}", sqlite_busy_timeout=0.05)
    outcome: list[BaseException | bool] = []

    def write() -> None:
        try:
            outcome.append(waiter.record(row("req_1")))
        except BaseException as error:
            outcome.append(error)

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=10)  # the old 30 s wait would still be blocked here
    finished = not thread.is_alive()
    holder.execute("ROLLBACK")
    holder.close()
    thread.join()
    waiter.close()
    assert finished
    assert len(outcome) == 1 and isinstance(outcome[0], OperationalError)


def test_an_admins_revoke_of_a_config_key_survives_a_restart(store: Store) -> None:
    ensure_config_keys(store, {"fs-leaked-config-key": "acme"}, [])
    leaked = store.find_key(hash_key("fs-leaked-config-key"))
    assert leaked is not None and store.revoke_key(leaked.key_id)
    ensure_config_keys(store, {"fs-leaked-config-key": "acme"}, [])  # the next start
    assert active_tenant(store, "fs-leaked-config-key") is None


def test_the_shown_prefix_of_a_short_key_does_not_reveal_it() -> None:
    record = make_key("acme", secret="demo1234").record
    assert len(record.prefix) <= 2


def test_a_sqlite_file_that_cannot_be_opened_is_an_outage_not_a_refusal(tmp_path: Path) -> None:
    """The ledger keeps retrying an outage for every row, but sets aside a row the store
    keeps refusing: a lost data directory must read as the first."""
    directory = tmp_path / "data"
    directory.mkdir()
    store = SqlStore(f"sqlite:///{directory / 'gone.db'}")
    store.migrate()
    store.engine.dispose()  # no pooled connection left to reuse
    shutil.rmtree(directory)
    with pytest.raises(STORE_AWAY):
        store.record_many([row("req_1")])
    store.close()


def test_sqlite_ledger_writes_reconnect_after_their_connection_fails(tmp_path: Path) -> None:
    """SQLite ledger rows are written on one kept connection: one that broke is dropped,
    its failure raised as the store's, and the next write connects anew."""
    sql = SqlStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    sql.migrate()
    assert sql.record_many([row("r1")]) == [True]
    kept = sql._ledger_connection
    assert kept is not None
    kept.connection.driver_connection.close()  # type: ignore[union-attr]
    with pytest.raises(DBAPIError):
        sql.record_many([row("r2")])
    assert sql.record_many([row("r2"), row("r1")]) == [True, False]
    assert [r.request_id for r in sql.ledger("t1")] == ["r1", "r2"]
    sql.close()


def test_a_sqlite_ledger_batch_with_a_bad_value_leaves_no_half_transaction(tmp_path: Path) -> None:
    """A row the driver cannot take fails its batch, and the rows before it in that batch
    are not left inserted in an open transaction (holding the write lock, and counted as
    billed by the next attempt)."""
    path = tmp_path / "ledger.db"
    sql = SqlStore(f"sqlite:///{path}")
    sql.migrate()
    bad = dataclasses.replace(row("bad"), cost_nanos=2**70)  # beyond SQLite's integers
    with pytest.raises(OverflowError):
        sql.record_many([row("r1"), bad])
    other = sqlite3.connect(path, timeout=0.1)  # another writer is not locked out
    other.execute("UPDATE ledger SET outcome = outcome")
    other.commit()
    other.close()
    assert sql.record_many([row("r1")]) == [True]  # not "already billed"
    sql.close()
