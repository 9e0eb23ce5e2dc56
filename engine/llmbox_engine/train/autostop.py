"""When to stop training early: pure rules over the history of evaluations (no torch).

Every evaluation records the mean train loss since the previous one and the validation loss. The
*monitored* loss is the validation loss, or the train loss when there is no validation set.

- best: the evaluation with the lowest monitored loss. A later one only counts as a new best when it beats the
  best by more than `min_delta` (relative, 0.1%), so noise in the fourth decimal does not reset patience.
- perfect loss: the latest monitored loss <= `perfect_loss` (0.01 instruction, 0.5 text-generation) -> stop;
  there is nothing left to learn and going on only memorises.
- diverged: the latest loss is NaN or infinite -> stop; no later step can recover from that.
- perplexity explosion (only with `perplexity_limit`, text tasks: 100): exp(latest monitored) > limit and the
  latest is worse than the best -> stop. The second condition keeps a run that merely *starts* high.
- overfitting: the validation loss trend rises (least-squares slope over the last 3 evaluations > 0, so it needs
  3 evaluations with validation) and the latest gap (val - train) / train > `overfitting_threshold`
  (10% instruction, 20% text) -> stop. A trend rather than one uptick, because a single noisy evaluation is common;
  the gap, because validation rising while it stays close to train is not yet memorisation.
- patience: `patience` evaluations (3 instruction, 5 text) without a new best -> stop.
- `enabled=False` (--force-epochs): never stop, but the decision still reports the best evaluation and the
  patience counters, so the best checkpoint can still be kept.

The rules are checked in that order and the first that fires gives the reason.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from llmbox.plan import TrainingPlan
from llmbox.planning.terms import TASK_THRESHOLDS

TASKS = ("instruction", "text-generation")
# Past this exp() overflows a float; perplexity is reported as inf instead.
_MAX_EXP_ARG = 700.0
# The trend is judged over this many evaluations: fewer is one noisy point, more reacts late.
TREND_WINDOW = 3


@dataclass(frozen=True)
class StopRules:
    perfect_loss: float  # instruction/QA 0.01, text-generation 0.5
    overfitting_threshold: float  # relative train/validation gap: (val - train) / train; 0.10 instruction, 0.20 text
    patience: int  # evaluations without a new best validation loss; 3 instruction, 5 text
    perplexity_limit: float | None = None  # text tasks: 100
    enabled: bool = True  # False under --force-epochs: never stop early
    min_delta: float = 0.001  # relative improvement a new best must make


@dataclass(frozen=True)
class Evaluation:
    step: int
    train_loss: float  # mean train loss since the previous evaluation
    val_loss: float | None  # None when there is no validation set


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str | None  # human sentence, e.g. "perfect loss: validation loss 0.0081 <= 0.01"
    best_index: int | None  # index into history of the best evaluation (lowest val loss, or train loss without val)
    evals_since_best: int
    patience_left: int


def rules_from_plan(plan: TrainingPlan) -> StopRules:
    """The rules a planned run uses; a rule the plan turned off (None) can never fire."""
    return StopRules(
        perfect_loss=plan.perfect_loss if plan.perfect_loss is not None else 0.0,
        overfitting_threshold=plan.overfitting_threshold if plan.overfitting_threshold is not None else math.inf,
        patience=plan.patience if plan.patience is not None else sys.maxsize,
        perplexity_limit=plan.perplexity_limit,
        enabled=plan.auto_stop,
    )


def rules_for_task(
    task: str,
    *,
    patience: int | None = None,
    overfitting_threshold: float | None = None,
    force_epochs: bool = False,
) -> StopRules:
    """The default rules for "instruction" or "text-generation" (the planner's table), with overrides."""
    if task not in TASK_THRESHOLDS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    defaults = TASK_THRESHOLDS[task]
    rules = StopRules(
        perfect_loss=defaults.perfect_loss,
        overfitting_threshold=defaults.overfitting_threshold,
        patience=defaults.patience,
        perplexity_limit=defaults.perplexity_limit,
    )
    if patience is not None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        rules = dataclasses.replace(rules, patience=patience)
    if overfitting_threshold is not None:
        if not overfitting_threshold > 0:
            raise ValueError(f"overfitting threshold must be positive, got {overfitting_threshold}")
        rules = dataclasses.replace(rules, overfitting_threshold=overfitting_threshold)
    if force_epochs:
        rules = dataclasses.replace(rules, enabled=False)
    return rules


def monitored(evaluation: Evaluation) -> float:
    """The loss the rules watch: validation, or train when there is no validation set."""
    return evaluation.val_loss if evaluation.val_loss is not None else evaluation.train_loss


def _label(evaluation: Evaluation) -> str:
    return "validation loss" if evaluation.val_loss is not None else "train loss"


def best_index(history: Sequence[Evaluation], min_delta: float = 0.001) -> int | None:
    """Index of the best evaluation; a later one must beat the best by more than `min_delta` (relative)."""
    best: int | None = None
    for i, evaluation in enumerate(history):
        loss = monitored(evaluation)
        if not math.isfinite(loss):
            continue
        if best is None or loss < monitored(history[best]) - min_delta * abs(monitored(history[best])):
            best = i
    return best


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError."""
    return math.inf if loss > _MAX_EXP_ARG else math.exp(loss)


def trend_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 when x does not vary."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


def overfitting_gap(evaluation: Evaluation) -> float | None:
    """(val - train) / train, or None without validation or with a train loss of 0."""
    if evaluation.val_loss is None or evaluation.train_loss <= 0:
        return None
    return (evaluation.val_loss - evaluation.train_loss) / evaluation.train_loss


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _check_perfect(latest: Evaluation, rules: StopRules) -> str | None:
    loss = monitored(latest)
    if loss <= rules.perfect_loss:
        return f"perfect loss: {_label(latest)} {_fmt(loss)} <= {_fmt(rules.perfect_loss)}"
    return None


def _check_diverged(latest: Evaluation) -> str | None:
    for name, loss in (("train loss", latest.train_loss), ("validation loss", latest.val_loss)):
        if loss is not None and not math.isfinite(loss):
            return f"diverged: {name} is {loss} at step {latest.step}"
    return None


def _check_perplexity(latest: Evaluation, best: Evaluation | None, rules: StopRules) -> str | None:
    if rules.perplexity_limit is None or best is None:
        return None
    loss = monitored(latest)
    # Compared in log space so a huge loss cannot overflow exp().
    if loss > math.log(rules.perplexity_limit) and loss > monitored(best):
        return (
            f"perplexity explosion: {_label(latest)} {_fmt(loss)} is perplexity {_fmt(perplexity(loss))} "
            f"> {_fmt(rules.perplexity_limit)}, up from {_fmt(monitored(best))} at step {best.step}"
        )
    return None


def _check_overfitting(history: Sequence[Evaluation], best: Evaluation | None, rules: StopRules) -> str | None:
    window = history[-TREND_WINDOW:]
    if len(window) < TREND_WINDOW or any(e.val_loss is None for e in window):
        return None
    points = [(float(e.step), e.val_loss) for e in window if e.val_loss is not None]
    # Steps, not evaluation indices: adaptive mode changes the interval between evaluations.
    slope = trend_slope(points)
    gap = overfitting_gap(window[-1])
    if slope <= 0 or gap is None or gap <= rules.overfitting_threshold:
        return None
    kept = f"; keeping the best at step {best.step}" if best is not None else ""
    return (
        f"overfitting: validation loss rising over the last {TREND_WINDOW} evaluations and "
        f"{gap:.1%} above train loss (limit {rules.overfitting_threshold:.0%}){kept}"
    )


def _check_patience(evals_since_best: int, best: Evaluation | None, rules: StopRules) -> str | None:
    if best is None or evals_since_best < rules.patience:
        return None
    return (
        f"no improvement in {evals_since_best} evaluations: best {_label(best)} {_fmt(monitored(best))} "
        f"at step {best.step}"
    )


def decide(history: Sequence[Evaluation], rules: StopRules) -> StopDecision:
    """Whether to stop after the latest evaluation in `history`, and why."""
    if not history:
        return StopDecision(stop=False, reason=None, best_index=None, evals_since_best=0, patience_left=rules.patience)
    index = best_index(history, rules.min_delta)
    best = history[index] if index is not None else None
    # With no finite loss yet, every evaluation so far counts as one without improvement.
    since_best = len(history) - 1 - index if index is not None else len(history)
    patience_left = max(0, rules.patience - since_best)
    latest = history[-1]

    reason: str | None = None
    if rules.enabled:
        reason = (
            _check_diverged(latest)
            or _check_perfect(latest, rules)
            or _check_perplexity(latest, best, rules)
            or _check_overfitting(history, best, rules)
            or _check_patience(since_best, best, rules)
        )
    return StopDecision(
        stop=reason is not None,
        reason=reason,
        best_index=index,
        evals_since_best=since_best,
        patience_left=patience_left,
    )
