"""The README's dashboard screenshot: a simulated server under mixed load, photographed.

    .venv/bin/python bench/dashboard_screenshot.py --out docs/dashboard.png

Starts `flexserve serve --backend simulated` (4 slots), then for `--seconds`: a flex flood
bigger than the flex queue (some get 429), default and priority requests that preempt
flex, and a 60-line batch; signs in to /dashboard with a read-only dashboard key in
headless chromium and takes a full-page screenshot at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import openai
from playwright.sync_api import sync_playwright

from _server import Server

MODEL = "smollm2-135m"
KEYS = {"screenshot-tenant-a": "acme", "screenshot-tenant-b": "globex"}
VIEWER = "screenshot-dashboard-viewer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    env = {
        "FLEXSERVE_API_KEYS": json.dumps(KEYS),
        "FLEXSERVE_DASHBOARD_KEYS": json.dumps([VIEWER]),
        "FLEXSERVE_SCHEDULER__FLEX_QUEUE_MAX_JOBS": "16",
        "FLEXSERVE_SIMULATED__NATURAL_OUTPUT_TOKENS": "40",
    }
    argv = ["--backend", "simulated", "--slots", "4", "--sim-tpot-ms", "30"]
    with Server(argv, env) as server:
        server.wait_healthy(30)
        stop = threading.Event()
        workers = [
            *(
                threading.Thread(target=loop, args=(server.base, "flex", 0.0, stop))
                for _ in range(16)
            ),
            *(
                threading.Thread(target=loop, args=(server.base, "default", 0.8, stop))
                for _ in range(2)
            ),
            threading.Thread(target=loop, args=(server.base, "priority", 2.0, stop)),
        ]
        for worker in workers:
            worker.start()
        submit_batch(server.base)
        try:
            photograph(server.base, args.out, args.seconds, args.chromium)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
    print(f"wrote {args.out}")


def loop(base: str, tier: str, pause: float, stop: threading.Event) -> None:
    """Ask again and again in `tier`; a 429 waits a little (what a polite client does)."""
    key = next(iter(KEYS)) if tier == "flex" else list(KEYS)[1]
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120) as c:
        while not stop.is_set():
            try:
                c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "tell me something"}],
                    service_tier=tier,  # type: ignore[arg-type]
                    max_tokens=48,
                )
            except openai.RateLimitError:
                stop.wait(1.0)
            stop.wait(pause)


def submit_batch(base: str) -> None:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "summarize"}]},
        }
        for i in range(60)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    with openai.OpenAI(base_url=base + "/v1", api_key=list(KEYS)[1]) as c:
        uploaded = c.files.create(file=("lines.jsonl", io.BytesIO(data)), purpose="batch")
        c.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )


def photograph(base: str, out: Path, seconds: float, chromium: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page: Any = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(base + "/dashboard")
        page.fill("#key", VIEWER)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#tier-flex")
        time.sleep(seconds)  # let the chart fill: this is a picture, not a test
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
