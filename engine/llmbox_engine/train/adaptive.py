"""Adaptive mode: adjust the learning rate and the evaluation interval from the loss curve (pure, no torch).

After each evaluation `adapt` compares the latest monitored loss (validation, or train without a validation
set) with the ones before it and changes at most one thing, checked in this order:

- rising (latest > previous by more than 1%): halve `lr_scale` (floor 0.1), because the steps are too large,
  and halve the evaluation interval (floor max(1, base // 4)) to watch the run closely while it is at risk;
- improving fast (latest > 10% better than previous): widen the evaluation interval x1.5 (cap 4 x base),
  because evaluating a run that is going well only wastes time;
- plateau (less than 1% better over the last 2 evaluations, i.e. latest vs the one two before): multiply
  `lr_scale` by 0.7 (floor 0.1), the usual reduce-on-plateau step;
- otherwise nothing changes.

A change that the floors or the cap swallow entirely counts as no change, so the note is None.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmbox_engine.train.autostop import Evaluation, monitored

MIN_LR_SCALE = 0.1
RISE = 0.01  # a relative rise above this is a real rise, not noise
PLATEAU = 0.01  # less relative improvement than this over the last 2 evaluations is a plateau
FAST = 0.10  # more relative improvement than this since the previous evaluation is fast
PLATEAU_LR_FACTOR = 0.7
MAX_INTERVAL_FACTOR = 4


@dataclass(frozen=True)
class AdaptiveState:
    eval_interval: int  # optimizer steps between evaluations
    base_eval_interval: int  # the interval the run started with; floors and caps are relative to it
    lr_scale: float = 1.0  # multiplies the scheduled learning rate

    @classmethod
    def start(cls, eval_interval: int) -> AdaptiveState:
        if eval_interval < 1:
            raise ValueError(f"eval interval must be at least 1, got {eval_interval}")
        return cls(eval_interval=eval_interval, base_eval_interval=eval_interval)

    @property
    def min_eval_interval(self) -> int:
        return max(1, self.base_eval_interval // 4)

    @property
    def max_eval_interval(self) -> int:
        return MAX_INTERVAL_FACTOR * self.base_eval_interval


def relative_improvement(before: float, after: float) -> float:
    """(before - after) / |before|: positive when the loss fell; 0 when `before` is 0 or a loss is not finite."""
    if before == 0 or not (math.isfinite(before) and math.isfinite(after)):
        return 0.0
    return (before - after) / abs(before)


def adapt(history: Sequence[Evaluation], state: AdaptiveState) -> tuple[AdaptiveState, str | None]:
    """The state for the next stretch of training, and a short note of what changed (None if nothing did)."""
    if len(history) < 2:
        return state, None
    latest, previous = monitored(history[-1]), monitored(history[-2])
    if not (math.isfinite(latest) and math.isfinite(previous)):
        return state, None  # a diverged run is auto-stop's business, not something to tune
    change = relative_improvement(previous, latest)

    if change < -RISE:
        new = dataclasses.replace(
            state,
            lr_scale=max(MIN_LR_SCALE, state.lr_scale / 2),
            eval_interval=max(state.min_eval_interval, state.eval_interval // 2),
        )
        why = f"loss rose {-change:.1%}"
    elif change > FAST:
        # At least +1 so an interval of 1 can still widen.
        wider = max(state.eval_interval + 1, round(state.eval_interval * 1.5))
        new = dataclasses.replace(state, eval_interval=min(state.max_eval_interval, wider))
        why = f"loss fell {change:.1%}"
    elif len(history) >= 3 and relative_improvement(monitored(history[-3]), latest) < PLATEAU:
        new = dataclasses.replace(state, lr_scale=max(MIN_LR_SCALE, state.lr_scale * PLATEAU_LR_FACTOR))
        why = f"loss plateaued ({-relative_improvement(monitored(history[-3]), latest):+.1%} over 2 evaluations)"
    else:
        return state, None
    return new, _note(why, state, new)


def _note(why: str, old: AdaptiveState, new: AdaptiveState) -> str | None:
    changes = []
    if new.lr_scale != old.lr_scale:
        changes.append(f"learning rate x{new.lr_scale / old.lr_scale:.2g} (now {new.lr_scale:.3g} x schedule)")
    if new.eval_interval != old.eval_interval:
        changes.append(f"evaluating every {new.eval_interval} steps (was {old.eval_interval})")
    if not changes:
        return None
    return f"{why}: {', '.join(changes)}"
