"""The persistence seam. Every implementation passes tests/contract/test_store.py."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from flexserve.store.records import KeyRecord, LedgerRow, TierUsage


class Store(Protocol):
    def migrate(self) -> None:
        """Bring the schema to the newest version (idempotent)."""
        ...

    def startup_lock(self) -> AbstractContextManager[None]:
        """Held while one replica reconciles config keys, so replicas take turns."""
        ...

    def add_key(self, key: KeyRecord) -> None: ...

    def update_key(self, key: KeyRecord) -> None:
        """Replace the stored fields of the key with this key_id."""
        ...

    def find_key(self, key_hash: str) -> KeyRecord | None: ...

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]: ...

    def revoke_key(self, key_id: str) -> bool:
        """An admin's revoke: final (config reconciliation never undoes it)."""
        ...

    def record(self, row: LedgerRow) -> bool:
        """Insert a ledger row; False (and no change) if its request id is already billed.

        Any other failure (another integrity error, the database away) raises."""
        ...

    def record_many(self, rows: Sequence[LedgerRow]) -> list[bool]:
        """`record` for each row, in one transaction where the store has them: for each
        row, False if its request id was already billed. Any other failure raises, and the
        rows may then be stored in part (a SQL store stores none): recording them again
        is safe."""
        ...

    def ledger(self, tenant: str) -> list[LedgerRow]: ...

    def usage(self, tenant: str | None, since: float = 0.0) -> list[TierUsage]:
        """Per tier, from `since` on: the tenant's, or every tenant's (None)."""
        ...

    def close(self) -> None: ...
