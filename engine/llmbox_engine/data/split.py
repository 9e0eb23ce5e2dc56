"""A deterministic train/validation split (the planner decides how many to hold out)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_examples(items: Sequence[T], n_val: int, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `n_val` items chosen by `seed`; both parts keep the original order."""
    if not 0 <= n_val < max(1, len(items)):
        raise ValueError(f"cannot hold out {n_val} of {len(items)} examples")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in held_out]
    val = [x for i, x in enumerate(items) if i in held_out]
    return train, val
