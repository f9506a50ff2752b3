"""Persistence behind one Protocol: SQL (SQLite or PostgreSQL) and an in-memory fake."""

from flexserve.store.base import Store
from flexserve.store.memory import MemoryStore
from flexserve.store.outage import STORE_AWAY
from flexserve.store.records import KeyRecord, LedgerRow, TierUsage
from flexserve.store.sql import SqlStore

__all__ = ["STORE_AWAY", "KeyRecord", "LedgerRow", "MemoryStore", "SqlStore", "Store", "TierUsage"]
