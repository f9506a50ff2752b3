"""The embedded engine's step planning, on plain data (no llama.cpp)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flexserve.backends.step_plan import EXACT_UBATCH, SequenceState, StepLimits, plan_step

LIMITS = StepLimits(prefill_chunk=256, background_chunk=16)


def generating(priority: int = 2) -> SequenceState:
    return SequenceState(priority=priority, background=False, prefill_remaining=0)


def prompt(tokens: int, priority: int = 2, background: bool = False) -> SequenceState:
    return SequenceState(priority=priority, background=background, prefill_remaining=tokens)


def test_every_generating_sequence_feeds_one_token() -> None:
    assert plan_step([generating(), generating(1), generating(3)], LIMITS) == [1, 1, 1]


def test_a_lone_prompt_fills_one_ubatch() -> None:
    assert plan_step([prompt(500)], LIMITS) == [EXACT_UBATCH]
    assert plan_step([prompt(500)], StepLimits(prefill_chunk=8, background_chunk=16)) == [8]


def test_a_prompt_never_gets_more_than_it_has_left() -> None:
    assert plan_step([prompt(5), prompt(500)], LIMITS) == [5, EXACT_UBATCH - 5]


def test_decoding_tokens_come_out_of_the_ubatch_but_a_prompt_always_moves() -> None:
    three = [generating()] * 3
    assert plan_step([*three, prompt(500)], LIMITS) == [1, 1, 1, EXACT_UBATCH - 3]
    crowded = [generating()] * (EXACT_UBATCH + 5)
    assert plan_step([*crowded, prompt(500)], LIMITS)[-1] == 1


def test_higher_priority_prompt_is_prefilled_first_whatever_its_seq_id() -> None:
    assert plan_step([prompt(500, priority=1), prompt(500, priority=3)], LIMITS) == [
        0,
        EXACT_UBATCH,
    ]


def test_beside_a_higher_priority_sequence_one_lower_prompt_prefills_at_most() -> None:
    plan = plan_step([generating(priority=3), prompt(10, priority=1), prompt(10, 1)], LIMITS)
    assert plan == [1, 10, 0]  # the second low prompt waits, though budget is left
    both_high = plan_step([generating(priority=1), prompt(10, 1), prompt(10, 1)], LIMITS)
    assert both_high == [1, 10, 10]


def test_a_higher_prompt_leaves_nothing_to_lower_ones() -> None:
    plan = plan_step([prompt(10, priority=1), prompt(10, priority=3)], LIMITS)
    assert plan == [0, 10]


def test_background_prompts_prefill_in_small_steps() -> None:
    plan = plan_step([prompt(500, background=True), prompt(500, background=True)], LIMITS)
    assert plan == [16, 16]
    beside_interactive = plan_step([prompt(500, background=True), prompt(500)], LIMITS)
    assert beside_interactive == [16, EXACT_UBATCH - 16]


def test_nothing_active_plans_nothing() -> None:
    assert plan_step([], LIMITS) == []


sequences = st.lists(
    st.builds(
        SequenceState,
        priority=st.integers(0, 3),
        background=st.booleans(),
        prefill_remaining=st.integers(0, 300) | st.just(0),
    ),
    max_size=12,
)
limits = st.builds(
    StepLimits, prefill_chunk=st.integers(1, 300), background_chunk=st.integers(1, 64)
)


@given(sequences, limits)
def test_a_step_is_one_ubatch_and_every_generating_sequence_moves(
    active: list[SequenceState], step: StepLimits
) -> None:
    plan = plan_step(active, step)
    decoding = sum(1 for s in active if s.prefill_remaining == 0)
    prefill = sum(n for n, s in zip(plan, active, strict=True) if s.prefill_remaining > 0)
    assert all(n == 1 for n, s in zip(plan, active, strict=True) if s.prefill_remaining == 0)
    assert prefill <= min(step.prefill_chunk, max(1, step.ubatch - decoding))
    for n, s in zip(plan, active, strict=True):
        assert 0 <= n <= max(s.prefill_remaining, 1)
        if s.background and s.prefill_remaining:
            assert n <= step.background_chunk
    if any(s.prefill_remaining for s in active):
        assert prefill > 0  # some prompt always moves: no step without progress
        first = max((s for s in active if s.prefill_remaining), key=lambda s: s.priority).priority
        served = [
            s.priority for n, s in zip(plan, active, strict=True) if n and s.prefill_remaining
        ]
        assert max(served) == first  # the most urgent waiting prompt is among those served
