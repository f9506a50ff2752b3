"""What goes into one engine step: a pure policy, no llama.cpp.

Each step is one `llama_decode` over every active sequence: one token for each sequence
that is generating, plus prompt tokens ("prefill") for sequences whose prompt, or whose
output so far after a preemption, is not yet in the KV cache. This module decides how many
prompt tokens each prefilling sequence feeds; the engine carries it out.

The rules, and why:
- One ubatch per step (`ubatch` tokens in all, at least one prompt token): a step is then
  one pass over the weights, so no stream (and no interactive prompt that arrives now)
  waits behind a multi-pass prefill.
- Higher priority first. While a higher-priority sequence is active, at most one
  lower-priority prompt prefills, and only when no higher one does: an interactive stream
  never waits on a flex re-prefill more than one ubatch's worth per step.
- Background (flex/batch) prompts feed at most `background_chunk` tokens a step: a step
  costs whoever waits for it, so background prefill keeps steps short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ggml's CPU flash attention switches to a tiled kernel, with another summation order, once
# one sequence has 64 query rows in a ubatch. Below that, a token's logits and KV entries
# do not depend on how tokens were grouped, so batching and re-prefill on resume are
# exact. Prefill speed is the same with ubatches of 32..256 tokens on this model.
EXACT_UBATCH = 63


@dataclass(frozen=True)
class SequenceState:
    """What the plan needs to know about one active sequence."""

    priority: int
    background: bool
    prefill_remaining: int
    """Tokens still to put in the KV cache before sampling; 0 = generating."""


@dataclass(frozen=True)
class StepLimits:
    prefill_chunk: int
    """Most prompt tokens in one step."""
    background_chunk: int
    """Most prompt tokens of one background sequence in one step."""
    ubatch: int = EXACT_UBATCH


def plan_step(sequences: Sequence[SequenceState], limits: StepLimits) -> list[int]:
    """Tokens each sequence feeds this step, in the order given (seq id order).

    1 for a generating sequence; for a prefilling one its share of the prompt budget, which
    may be 0 (it waits for a later step).
    """
    decoding = sum(1 for s in sequences if s.prefill_remaining == 0)
    budget = min(limits.prefill_chunk, max(1, limits.ubatch - decoding))
    top = max((s.priority for s in sequences), default=0)
    plan = [1 if s.prefill_remaining == 0 else 0 for s in sequences]
    prefilling = sorted(
        (i for i, s in enumerate(sequences) if s.prefill_remaining > 0),
        key=lambda i: (-sequences[i].priority, i),
    )
    granted = False
    for i in prefilling:
        seq = sequences[i]
        if budget <= 0 or (seq.priority < top and granted):
            break
        share = min(budget, seq.prefill_remaining)
        if seq.background:
            share = min(share, limits.background_chunk)
        plan[i] = share
        budget -= share
        granted = True
    return plan
