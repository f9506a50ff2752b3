"""Keys at start-up and under load: config keys are reconciled, and a flood of unknown
keys (each a database lookup) cannot starve tokenizing or ledger writes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from flexserve.api import create_app
from flexserve.store import KeyRecord, MemoryStore
from tests.conftest import KEY, OTHER_KEY, RunningServer, free_port, make_settings

Serve = Callable[..., RunningServer]


def ask(server: RunningServer, key: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=10)
    return client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )


def test_config_keys_are_reconciled_when_the_server_starts(serve: Serve) -> None:
    serve()  # stores KEY for tenant-a and OTHER_KEY for tenant-b
    restarted = serve(api_keys={KEY: "tenant-c"})  # same database, a new config
    ask(restarted, KEY)
    rows = restarted.state.store.ledger("tenant-c")
    assert len(rows) == 1 and restarted.state.store.ledger("tenant-a") == []
    with pytest.raises(openai.AuthenticationError):
        ask(restarted, OTHER_KEY)


class GatedStore(MemoryStore):
    """Once armed, lookups of unknown keys hang until the gate opens, like a stuck
    database."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.gate = threading.Event()
        self.waiting = 0

    def find_key(self, key_hash: str) -> KeyRecord | None:
        found = super().find_key(key_hash)
        if found is None and self.armed:
            self.waiting += 1
            self.gate.wait(timeout=30)
        return found


@pytest.fixture
def gated_server(tmp_path: Path) -> Iterator[tuple[RunningServer, GatedStore]]:
    store = GatedStore()
    settings = make_settings(tmp_path, auth_lookup_threads=2)
    app = create_app(settings, store=store)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{server.config.port}", settings, app.state.flexserve)
    running.wait_until(lambda: server.started)
    yield running, store
    store.gate.set()
    server.should_exit = True
    thread.join(timeout=30)


def test_a_flood_of_unknown_keys_does_not_starve_a_valid_request(
    gated_server: tuple[RunningServer, GatedStore],
) -> None:
    server, store = gated_server
    ask(server, KEY)  # known and cached
    store.armed = True
    statuses: list[int] = []

    def bad(index: int) -> None:
        headers = {"authorization": f"Bearer fs-unknown-{index}"}
        reply = httpx.post(server.url + "/chat/completions", headers=headers, json={}, timeout=60)
        statuses.append(reply.status_code)

    flood = [threading.Thread(target=bad, args=(i,)) for i in range(16)]
    for thread in flood:
        thread.start()
    server.wait_until(lambda: store.waiting >= 2)  # every lookup thread is stuck
    reply = ask(server, KEY)  # tokenizing and the ledger still have their threads
    assert reply.choices[0].message.content
    store.gate.set()
    for thread in flood:
        thread.join()
    assert statuses == [401] * 16
