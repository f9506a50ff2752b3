"""Service tiers and their strict order: the one place that names tier sets."""

from __future__ import annotations

from typing import Final, Literal, get_args

Tier = Literal["priority", "default", "flex", "batch"]
RequestedTier = Literal["auto", "priority", "default", "flex"]

TIERS: Final[tuple[Tier, ...]] = get_args(Tier)
REQUESTABLE: Final[tuple[str, ...]] = get_args(RequestedTier)
RANK: Final[dict[Tier, int]] = {tier: index for index, tier in enumerate(TIERS)}
INTERACTIVE: Final[frozenset[Tier]] = frozenset({"priority", "default"})
INTERACTIVE_ORDER: Final[tuple[Tier, ...]] = ("priority", "default")
PREEMPTIBLE: Final[tuple[Tier, ...]] = ("flex", "batch")
QUOTED: Final[tuple[Tier, ...]] = ("priority", "default", "flex")
"""Tiers a single request can be served in (batch comes only through the Batch API)."""
ALIASES: Final[dict[str, Tier]] = {"fast": "priority"}
"""Other names clients may send for a tier (OpenAI's newer `fast` is `priority`)."""


def is_interactive(tier: Tier) -> bool:
    return tier in INTERACTIVE
