"""A probe of the server's garbage collector, for benchmarks only (never installed).

Put this folder first on the server's PYTHONPATH, e.g.

    .venv/bin/python bench/tiers.py --deep 1200 --server-env PYTHONPATH=bench/gc_probe \
        --server-env GCPROBE_LOG=/tmp/gc.log

and Python imports it at start-up: every full (generation 2) collection is logged with
its duration and the number of tracked objects. GCPROBE_TUNE=1 also tries the remedy
discussed in bench/RESULTS.md: freeze what start-up created (4 s in) and collect the
young generations less often, so that full collections become rare.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any

if "serve" in sys.argv and os.environ.get("GCPROBE_LOG"):
    _log = open(os.environ["GCPROBE_LOG"], "a", buffering=1)  # noqa: SIM115 (process-long)
    _started: list[float] = [0.0]

    def _observe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        elif info["generation"] == 2:
            pause = (time.perf_counter() - _started[0]) * 1000
            tracked = len(gc.get_objects())
            line = f"{time.monotonic():.3f} full collection {pause:.1f} ms, {tracked} tracked"
            _log.write(line + "\n")

    gc.callbacks.append(_observe)

    if os.environ.get("GCPROBE_TUNE"):
        gc.set_threshold(10_000, 50, 1000)

        def _freeze() -> None:
            gc.collect()
            gc.freeze()
            _log.write(f"{time.monotonic():.3f} froze {gc.get_freeze_count()} objects\n")

        threading.Timer(4.0, _freeze).start()
