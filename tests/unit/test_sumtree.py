"""The scheduler's ordered sum tree against a sorted list doing the same work."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from flexserve.scheduling.sumtree import Key, SumTree

keys = st.tuples(st.integers(0, 20), st.integers(0, 20))
operations = st.lists(st.tuples(st.booleans(), keys, st.floats(0, 100)), max_size=60)


def check(tree: SumTree, model: dict[Key, float], probe: Key) -> None:
    ordered = sorted(model)
    assert tree.first() == (ordered[0] if ordered else None)
    assert len(tree) == len(model)
    below = [k for k in ordered if k < probe]
    count, total = tree.below(probe)
    assert count == len(below)
    assert abs(total - sum(model[k] for k in below)) < 1e-6
    assert abs(tree.total - sum(model.values())) < 1e-6


@given(operations, keys)
def test_inserts_and_removes_keep_order_counts_and_sums(
    ops: list[tuple[bool, Key, float]], probe: Key
) -> None:
    # Trees may share a generator (the scheduler's queues do); results never depend on it.
    shared = random.Random(7)
    for tree in (SumTree(), SumTree(shared), SumTree(shared)):
        model: dict[Key, float] = {}
        for insert, key, value in ops:
            if insert and key not in model:
                tree.insert(key, value)
                model[key] = value
            elif not insert and key in model:
                assert tree.remove(key) == model.pop(key)
            check(tree, model, probe)
        assert tree.items() == sorted(model.items())
