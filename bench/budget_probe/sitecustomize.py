"""A probe of the latency budget's controller, for benchmarks only (never installed).

Put this folder first on the server's PYTHONPATH, e.g.

    .venv/bin/python bench/tiers.py --backend embedded --slowdown-budgets 1.5 \
        --server-env PYTHONPATH=bench/budget_probe --server-env BUDGET_LOG=/tmp/budget.log

and Python imports it at start-up: every sample the controller learns from is logged
with its time, width (flex/batch sequences beside), mean time per token, the slowdown
it now estimates for that width, the width it allows after it, and its baseline.
"""

from __future__ import annotations

import os
import sys

if "serve" in sys.argv and os.environ.get("BUDGET_LOG"):
    from flexserve.scheduling import latency_budget

    _log = open(os.environ["BUDGET_LOG"], "a", buffering=1)  # noqa: SIM115 (process-long)
    _learn = latency_budget.LatencyBudget._learn

    def _logged(self: latency_budget.LatencyBudget, width: int, sample: float, now: float) -> None:
        _learn(self, width, sample, now)
        baseline = self.slowdown(0) and self._estimates[0].value
        _log.write(
            f"{now:.3f} w={width} sample_ms={sample * 1000:.1f} "
            f"slowdown={self.slowdown(width)} allowed={self._width} "
            f"baseline_ms={baseline * 1000 if baseline else None}\n"
        )

    latency_budget.LatencyBudget._learn = _logged  # type: ignore[method-assign]
