"""An ordered set of keys, each carrying a value, that sums the values below a key in
O(log n): what lets the scheduler answer "how much work is ahead of this job" without
walking the queue.

A treap (a binary search tree kept balanced by random heap priorities) whose every
node also holds the count and the sum of the values in its subtree. The priorities
come from a seeded generator, so runs are reproducible.
"""

from __future__ import annotations

import random
from typing import Any

Key = tuple[Any, ...]


class _Node:
    __slots__ = ("count", "key", "left", "priority", "right", "total", "value")

    def __init__(self, key: Key, value: float, priority: float) -> None:
        self.key = key
        self.value = value
        self.priority = priority
        self.left: _Node | None = None
        self.right: _Node | None = None
        self.count = 1
        self.total = value


def _pull(node: _Node) -> None:
    count, total = 1, node.value
    if node.left is not None:
        count += node.left.count
        total += node.left.total
    if node.right is not None:
        count += node.right.count
        total += node.right.total
    node.count, node.total = count, total


def _split(node: _Node | None, key: Key) -> tuple[_Node | None, _Node | None]:
    """(keys < key, keys >= key)."""
    if node is None:
        return None, None
    if node.key < key:
        node.right, right = _split(node.right, key)
        _pull(node)
        return node, right
    left, node.left = _split(node.left, key)
    _pull(node)
    return left, node


def _merge(low: _Node | None, high: _Node | None) -> _Node | None:
    """Every key of `low` is below every key of `high`."""
    if low is None:
        return high
    if high is None:
        return low
    if low.priority > high.priority:
        low.right = _merge(low.right, high)
        _pull(low)
        return low
    high.left = _merge(low, high.left)
    _pull(high)
    return high


class SumTree:
    """Unique keys in order, each with a value: insert, remove, first, and the count and
    sum of the values of the keys below a given one, each in O(log n) expected."""

    def __init__(self, priorities: random.Random | None = None) -> None:
        """`priorities`: a seeded generator, which may be shared by many trees (the
        scheduler makes a tree per tenant's line whenever one starts to queue, and
        seeding a generator costs more than a tree's insert and remove together)."""
        self._root: _Node | None = None
        self._values: dict[Key, float] = {}
        self._random = priorities or random.Random(0)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Key) -> bool:
        return key in self._values

    @property
    def total(self) -> float:
        return 0.0 if self._root is None else self._root.total

    def insert(self, key: Key, value: float) -> None:
        if key in self._values:
            raise KeyError(f"duplicate key {key!r}")
        self._values[key] = value
        low, high = _split(self._root, key)
        self._root = _merge(_merge(low, _Node(key, value, self._random.random())), high)

    def remove(self, key: Key) -> float:
        value = self._values.pop(key)
        low, rest = _split(self._root, key)
        _, high = _split_after(rest, key)
        self._root = _merge(low, high)
        return value

    def first(self) -> Key | None:
        node = self._root
        if node is None:
            return None
        while node.left is not None:
            node = node.left
        return node.key

    def below(self, key: Key) -> tuple[int, float]:
        """(count, sum of values) of the keys strictly below `key`."""
        count, total = 0, 0.0
        node = self._root
        while node is not None:
            if node.key < key:
                count += 1
                total += node.value
                if node.left is not None:
                    count += node.left.count
                    total += node.left.total
                node = node.right
            else:
                node = node.left
        return count, total

    def items(self) -> list[tuple[Key, float]]:
        """Every (key, value) in key order: O(n), for tests and diagnostics only."""
        return sorted(self._values.items())


def _split_after(node: _Node | None, key: Key) -> tuple[_Node | None, _Node | None]:
    """(keys <= key, keys > key)."""
    if node is None:
        return None, None
    if node.key <= key:
        node.right, right = _split_after(node.right, key)
        _pull(node)
        return node, right
    left, node.left = _split_after(node.left, key)
    _pull(node)
    return left, node
