"""How a tier becomes the upstream engine's own priority field, so its queue agrees with ours.

vLLM (`--scheduling-policy priority`) runs lower values first; SGLang
(`--enable-priority-scheduling`) runs higher values first unless started with
`--schedule-low-priority-values-first`. Engines without priority scheduling get no field:
vLLM rejects `priority` when its policy is FCFS.
"""

from __future__ import annotations

from typing import Any, Literal

from flexserve.scheduling.tiers import RANK, TIERS, Tier

PriorityStyle = Literal["vllm", "sglang", "none"]


def priority_fields(style: PriorityStyle, tier: Tier) -> dict[str, Any]:
    """The body fields that tell the upstream engine how urgent a job of `tier` is."""
    if style == "vllm":
        return {"priority": RANK[tier]}  # priority 0 ... batch 3: lower runs first
    if style == "sglang":
        return {"priority": len(TIERS) - 1 - RANK[tier]}  # priority 3 ... batch 0
    return {}
