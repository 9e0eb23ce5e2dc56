"""The learning-rate schedule: linear warm-up, then cosine decay to a tenth, or flat when the run has no end."""

from __future__ import annotations

import math

WARMUP_FRACTION = 0.03
MAX_WARMUP_STEPS = 100
FINAL_FRACTION = 0.1


def warmup_steps(total_steps: int | None) -> int:
    if total_steps is None:
        return 10
    return max(1, min(MAX_WARMUP_STEPS, round(total_steps * WARMUP_FRACTION)))


def learning_rate_at(step: int, peak: float, total_steps: int | None) -> float:
    """LR for optimizer step `step` (0-based). `total_steps=None` (non-stop, circular): flat after warm-up."""
    warm = warmup_steps(total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if total_steps is None or total_steps <= warm:
        return peak
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return peak * (FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
