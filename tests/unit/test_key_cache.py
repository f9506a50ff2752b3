"""The key cache: known keys for key_cache_seconds, unknown ones for
key_negative_cache_seconds, by an injected clock; a revoke here forgets at once."""

from __future__ import annotations

import asyncio

from flexserve.api.key_cache import KeyCache
from flexserve.config import Settings
from flexserve.keys import hash_key, make_key
from flexserve.store import KeyRecord, MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def find_key(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        return super().find_key(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(store: CountingStore, clock: Clock) -> KeyCache:
    settings = Settings(key_cache_seconds=30.0, key_negative_cache_seconds=5.0)
    return KeyCache(store, settings, clock)


def test_a_known_key_is_asked_again_only_after_its_ttl() -> None:
    store, clock = CountingStore(), Clock()
    new = make_key("acme")
    store.add_key(new.record)
    store.lookups = 0
    keys = cache(store, clock)

    async def run() -> None:
        assert await keys.find(new.record.key_hash) == new.record
        clock.now = 29.9
        assert await keys.find(new.record.key_hash) == new.record
        assert store.lookups == 1
        store.revoke_key(new.record.key_id)  # on another replica, say
        clock.now = 30.1
        assert await keys.find(new.record.key_hash) is None
        assert store.lookups == 2

    asyncio.run(run())
    keys.close()


def test_an_unknown_key_is_cached_negatively_for_a_short_time() -> None:
    store, clock = CountingStore(), Clock()
    keys = cache(store, clock)
    unknown = hash_key("fs-nope")

    async def run() -> None:
        results = await asyncio.gather(*(keys.find(unknown) for _ in range(10)))
        assert results == [None] * 10
        assert await keys.find(unknown) is None
        assert store.lookups == 1  # ten at once and one after: one query
        clock.now = 5.1
        assert await keys.find(unknown) is None
        assert store.lookups == 2

    asyncio.run(run())
    keys.close()


def test_forget_drops_both_caches() -> None:
    store, clock = CountingStore(), Clock()
    keys = cache(store, clock)
    new = make_key("acme")

    async def run() -> None:
        assert await keys.find(new.record.key_hash) is None  # not created yet
        store.add_key(new.record)
        keys.forget()  # the admin route that created it does this
        assert await keys.find(new.record.key_hash) == new.record

    asyncio.run(run())
    keys.close()
