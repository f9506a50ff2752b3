"""Service tiers and their strict order."""

from __future__ import annotations

from typing import Final, Literal, get_args

Tier = Literal["priority", "default", "flex", "batch"]
RequestedTier = Literal["auto", "priority", "default", "flex"]

TIERS: Final[tuple[Tier, ...]] = get_args(Tier)
REQUESTABLE: Final[tuple[str, ...]] = get_args(RequestedTier)
RANK: Final[dict[Tier, int]] = {tier: index for index, tier in enumerate(TIERS)}
INTERACTIVE: Final[frozenset[Tier]] = frozenset({"priority", "default"})
PREEMPTIBLE: Final[tuple[Tier, ...]] = ("flex", "batch")


def is_interactive(tier: Tier) -> bool:
    return tier in INTERACTIVE
