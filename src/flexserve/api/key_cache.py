"""Key lookups: cached (known keys and unknown ones), in their own threads.

Known keys are trusted for `key_cache_seconds`, so a revoke on another replica takes
effect there after at most that long; unknown (or revoked) keys are answered from a
negative cache for `key_negative_cache_seconds`, so a flood of bad keys does not become a
flood of queries. Lookups run in their own small thread pool: however many of them wait
on the database, tokenizing and ledger writes keep their threads (and connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cachetools import TTLCache

from flexserve.config import Settings
from flexserve.errors import StoreUnavailable
from flexserve.store import STORE_AWAY, KeyRecord, Store

STORE_RETRY_AFTER = 2.0
"""Seconds a client is asked to wait when the key store cannot be reached."""


class KeyCache:
    def __init__(
        self, store: Store, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.clock = clock
        """Read on every cache access, so a test may swap it for a fake clock."""
        size = settings.key_cache_size
        self._known_ttl = settings.key_cache_seconds
        self._unknown_ttl = settings.key_negative_cache_seconds
        self._known: TTLCache[str, KeyRecord] = TTLCache(size, max(self._known_ttl, 0), self._now)
        self._unknown: TTLCache[str, bool] = TTLCache(size, max(self._unknown_ttl, 0), self._now)
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0
        self._lookups = ThreadPoolExecutor(
            settings.auth_lookup_threads, thread_name_prefix="key-lookup"
        )

    def _now(self) -> float:
        return self.clock()

    async def find(self, key_hash: str) -> KeyRecord | None:
        """The active key with this hash, or None (unknown or revoked)."""
        known = self._known.get(key_hash)
        if known is not None:
            return known
        if key_hash in self._unknown:
            return None
        lookup = self._inflight.get(key_hash)
        if lookup is None:  # many requests with one new key: one query
            lookup = asyncio.ensure_future(self._lookup(key_hash))
            self._inflight[key_hash] = lookup
            lookup.add_done_callback(lambda done: self._forget_lookup(key_hash, done))
        return await asyncio.shield(lookup)  # one client leaving cancels no one else's

    def _forget_lookup(self, key_hash: str, lookup: asyncio.Future[KeyRecord | None]) -> None:
        if self._inflight.get(key_hash) is lookup:
            del self._inflight[key_hash]

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        generation = self._generation
        loop = asyncio.get_running_loop()
        try:
            key = await loop.run_in_executor(self._lookups, self.store.find_key, key_hash)
        except STORE_AWAY:
            raise StoreUnavailable(
                "The key store cannot be reached right now; retry shortly.",
                retry_after=STORE_RETRY_AFTER,
            ) from None
        active = key if key is not None and not key.revoked else None
        if generation != self._generation:  # a revoke happened meanwhile: cache nothing
            return active
        if active is not None and self._known_ttl > 0:
            self._known[key_hash] = active
        elif active is None and self._unknown_ttl > 0:
            self._unknown[key_hash] = True
        return active

    def forget(self) -> None:
        """After a revoke or a new key here: ask the store again, and do not cache any
        lookup that began before."""
        self._known.clear()
        self._unknown.clear()
        self._inflight.clear()
        self._generation += 1

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
