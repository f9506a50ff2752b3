"""An in-memory Store: the fake that ships for users' tests (same contract as SQL)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

from flexserve.store.records import KeyRecord, LedgerRow, TierUsage


class MemoryStore:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._ledger: dict[str, LedgerRow] = {}
        self._lock = threading.Lock()
        self._startup = threading.Lock()

    def migrate(self) -> None:
        return None

    @contextlib.contextmanager
    def startup_lock(self) -> Iterator[None]:
        with self._startup:
            yield

    def add_key(self, key: KeyRecord) -> None:
        with self._lock:
            if key.key_id in self._keys or self.find_key(key.key_hash) is not None:
                raise ValueError("duplicate key")
            self._keys[key.key_id] = key

    def update_key(self, key: KeyRecord) -> None:
        with self._lock:
            if key.key_id in self._keys:
                self._keys[key.key_id] = key

    def find_key(self, key_hash: str) -> KeyRecord | None:
        return next((k for k in self._keys.values() if k.key_hash == key_hash), None)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        keys = sorted(self._keys.values(), key=lambda k: k.created_at)
        return [k for k in keys if tenant is None or k.tenant == tenant]

    def revoke_key(self, key_id: str) -> bool:
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                return False
            self._keys[key_id] = dataclasses.replace(key, revoked=True, from_config=False)
            return True

    def record(self, row: LedgerRow) -> bool:
        with self._lock:
            if row.request_id in self._ledger:
                return False
            self._ledger[row.request_id] = row
            return True

    def record_many(self, rows: Sequence[LedgerRow]) -> list[bool]:
        """Row by row (no transactions here): a failure leaves the rows before it stored;
        the ledger delivers them again, which `record` skips."""
        return [self.record(row) for row in rows]

    def ledger(self, tenant: str) -> list[LedgerRow]:
        rows = [r for r in self._ledger.values() if r.tenant == tenant]
        return sorted(rows, key=lambda r: r.created_at)

    def usage(self, tenant: str | None, since: float = 0.0) -> list[TierUsage]:
        totals: dict[str, list[int]] = {}
        for row in self._ledger.values():
            if row.created_at < since or tenant not in (None, row.tenant):
                continue
            t = totals.setdefault(row.tier, [0, 0, 0, 0, 0])
            for i, value in enumerate(
                (1, row.input_tokens, row.output_tokens, row.cost_nanos, row.list_cost_nanos)
            ):
                t[i] += value
        return [TierUsage(tier, *values) for tier, values in sorted(totals.items())]  # type: ignore[arg-type]

    def close(self) -> None:
        return None
