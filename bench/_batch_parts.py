"""Parts of bench/batch.py: batch files and the API calls that carry them, the
validation (upload) measurement and the finalize measurement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

import _load
from _server import Server

KEY = "bench-batch-key"
MODEL = "smollm2-135m"  # the default model_name
TOKENS = 32
"""Answer length (simulated natural length and max_tokens of every request)."""


# ---- batch files -------------------------------------------------------------------------


def write_batch_file(
    path: Path, model: str, lines: int, pad: int = 0, max_tokens: int = TOKENS
) -> int:
    """`lines` chat requests (each `pad` characters of extra prompt); returns bytes."""
    filler = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad]
    with path.open("w") as out:
        for i in range(lines):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"batch line {i} {filler}"}],
                "max_tokens": max_tokens,
            }
            line = {"custom_id": f"line-{i}", "method": "POST", "url": _load.CHAT_PATH}
            out.write(json.dumps({**line, "body": body}) + "\n")
    return path.stat().st_size


def upload(base: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        resp = httpx.post(
            base + "/v1/files",
            headers={"authorization": f"Bearer {KEY}"},
            files={"file": (path.name, f, "application/jsonl")},
            data={"purpose": "batch"},
            timeout=600,
        )
    resp.raise_for_status()
    body: dict[str, Any] = resp.json()
    return body


def api(base: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    resp = httpx.request(
        method,
        base + path,
        headers={"authorization": f"Bearer {KEY}"},
        json=body,
        timeout=120,
    )
    resp.raise_for_status()
    out: dict[str, Any] = resp.json()
    return out


def create_batch(base: str, file_id: str) -> str:
    made = api(
        base,
        "POST",
        "/v1/batches",
        {
            "input_file_id": file_id,
            "endpoint": _load.CHAT_PATH,
            "completion_window": "24h",
        },
    )
    return str(made["id"])


def memory_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


# ---- part 2: validation ------------------------------------------------------------------


def measure_upload(path: Path, lines: int, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """A fresh server, one upload: seconds, lines/s, memory growth (MB)."""
    with Server(args, env) as server:
        server.wait_healthy(30)
        assert server.proc is not None
        pid = server.proc.pid
        before = memory_kb(pid)
        start = time.monotonic()
        record = upload(server.base, path)
        elapsed = time.monotonic() - start
        after = memory_kb(pid)
    if record["status"] != "processed" or record["batch_input"]["requests"] != lines:
        raise RuntimeError(f"upload not validated: {record}")
    return {
        "bytes": path.stat().st_size,
        "seconds": round(elapsed, 3),
        "lines_per_s": round(lines / elapsed, 1),
        "rss_before_mb": round(before["VmRSS"] / 1024, 1),
        "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
    }


# ---- part 3: finalize --------------------------------------------------------------------


def result_line(batch_id: str, custom_id: str) -> str:
    """A done line as the runner stores it: a chat.completion of TOKENS words."""
    from flexserve.batch.runner import batch_request_id

    request_id = batch_request_id(batch_id, custom_id)
    body = {
        "id": "chatcmpl-" + request_id.removeprefix("batch_req_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "smollm2-135m",
        "service_tier": "batch",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * TOKENS, "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": TOKENS, "total_tokens": 40 + TOKENS},
    }
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return json.dumps({"custom_id": custom_id, "response": response, "error": None})


def measure_finalize(lines: int, workdir: Path, url: str | None = None) -> dict[str, Any]:
    """The runner's finalize of a batch whose `lines` lines are all done, on SQLite (or
    the database at `url`)."""
    from sqlalchemy import bindparam, update

    from flexserve.batch.runner import BatchRunner
    from flexserve.batch.service import BatchService
    from flexserve.config import load_settings
    from flexserve.store.batch_records import BatchRecord
    from flexserve.store.batch_sql import BatchStore
    from flexserve.store.schema import batch_items
    from flexserve.store.sql import SqlStore

    workdir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(None, data_dir=workdir, backend="simulated", database_url=url)
    sql = SqlStore(settings.resolved_database_url())
    sql.migrate()
    store = BatchStore(sql.engine)
    service = BatchService(store, settings, lambda _model: True)
    now = time.time()
    record = BatchRecord(
        batch_id="batch-finalize-bench",
        tenant="bench",
        input_file_id="file-none",
        endpoint=_load.CHAT_PATH,
        model="m",
        completion_window="24h",
        metadata=None,
        status="in_progress",
        created_at=now,
        in_progress_at=now,
        expires_at=now + 86400,
        total=lines,
    )
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    store.create_batch(record, ((i, f"line-{i}", body) for i in range(lines)))
    results = [{"n": i, "result": result_line(record.batch_id, f"line-{i}")} for i in range(lines)]
    with sql.engine.begin() as conn:
        conn.execute(
            update(batch_items)
            .where(batch_items.c.batch_id == record.batch_id)
            .where(batch_items.c.line_no == bindparam("n"))
            .values(status="done", result=bindparam("result"), finished_at=now),
            results,
        )
    result_bytes = sum(len(r["result"]) for r in results)
    del results
    runner = BatchRunner(service, None, None)  # type: ignore[arg-type]  # finalize needs neither
    start = time.monotonic()
    asyncio.run(runner._finalize(record))
    elapsed = time.monotonic() - start
    final = store.get_batch(record.batch_id)
    assert final is not None and final.status == "completed" and final.output_file_id
    output = store.get_file("bench", final.output_file_id)
    assert output is not None
    sql.engine.dispose()
    return {
        "lines": lines,
        "seconds": round(elapsed, 3),
        "result_mb": round(result_bytes / 2**20, 1),
        "output_mb": round(output.bytes / 2**20, 1),
    }


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL at `url` (dropped after): its URL."""
    from sqlalchemy import create_engine, text

    schema = "bench_" + uuid.uuid4().hex[:10]
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"create schema {schema}"))
    try:
        yield f"{url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"drop schema {schema} cascade"))
        admin.dispose()
