"""A deterministic train/validation split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def validation_size(n: int, fraction: float) -> int:
    """At least one validation example once there are two records, and never all of them."""
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def split_examples(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    if not 0 <= fraction < 1:
        raise ValueError(f"validation split must be in [0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = validation_size(len(items), fraction)
    held_out = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in held_out]
    val = [x for i, x in enumerate(items) if i in held_out]
    return train, val
