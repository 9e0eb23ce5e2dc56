"""Auto-stop rules, the adaptive controller and the history plot, on synthetic loss curves."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from llmbox_engine.train.adaptive import AdaptiveState, adapt
from llmbox_engine.train.autostop import Evaluation, StopRules, decide, rules_for_task
from llmbox_engine.train.history_plot import plot_history, smooth

INSTRUCTION = rules_for_task("instruction")
TEXT = rules_for_task("text-generation")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def curve(train: Sequence[float], val: Sequence[float | None] | None = None, every: int = 10) -> list[Evaluation]:
    """Evaluations every `every` steps; no `val` means no validation set."""
    vals: Sequence[float | None] = val if val is not None else [None] * len(train)
    pairs = zip(train, vals, strict=True)
    return [Evaluation(step=every * (i + 1), train_loss=t, val_loss=v) for i, (t, v) in enumerate(pairs)]


def never_stops(history: Sequence[Evaluation], rules: StopRules) -> bool:
    """No prefix of the history stops: what a run evaluating after each point would see."""
    return not any(decide(history[: n + 1], rules).stop for n in range(len(history)))


# Curves that each trip one rule (for the rules named).
OVERFIT = curve([1.0, 0.9, 0.8], [0.85, 0.87, 0.90])  # val rising, gap 12.5%
OVERFIT_TEXT = curve([1.0, 0.9, 0.7], [0.85, 0.87, 0.90])  # gap 28.6%: over the text threshold too
PERFECT = curve([0.5, 0.05, 0.01], [0.6, 0.1, 0.0081])
FLAT = curve([1.0] * 7, [1.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])  # best at index 1, then nothing
EXPLOSION = curve([2.1, 2.0], [2.0, 5.0])


# --- defaults and overrides -----------------------------------------------------------------------------------------


def test_defaults_by_task() -> None:
    assert (INSTRUCTION.perfect_loss, INSTRUCTION.overfitting_threshold, INSTRUCTION.patience) == (0.01, 0.10, 3)
    assert INSTRUCTION.perplexity_limit is None and INSTRUCTION.enabled
    assert (TEXT.perfect_loss, TEXT.overfitting_threshold, TEXT.patience, TEXT.perplexity_limit) == (0.5, 0.2, 5, 100)


def test_overrides_and_force_epochs() -> None:
    rules = rules_for_task("instruction", patience=6, overfitting_threshold=0.3)
    assert (rules.patience, rules.overfitting_threshold, rules.perfect_loss) == (6, 0.3, 0.01)
    assert not rules_for_task("text-generation", force_epochs=True).enabled
    # patience 6 outlasts the 5 flat evaluations that stop the default
    assert decide(FLAT, INSTRUCTION).stop
    assert not decide(FLAT, rules).stop
    # a 30% threshold tolerates the 12.5% gap that stops the default
    assert decide(OVERFIT, INSTRUCTION).stop
    assert not decide(OVERFIT, rules).stop
    assert decide(OVERFIT, rules_for_task("instruction", overfitting_threshold=0.05)).stop


def test_bad_task_and_overrides_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        rules_for_task("classification")
    with pytest.raises(ValueError, match="patience"):
        rules_for_task("instruction", patience=0)
    with pytest.raises(ValueError, match="threshold"):
        rules_for_task("instruction", overfitting_threshold=0)


# --- perfect loss -------------------------------------------------------------------------------------------------


def test_perfect_loss_stops_with_reason() -> None:
    decision = decide(PERFECT, INSTRUCTION)
    assert decision.stop
    assert decision.reason == "perfect loss: validation loss 0.0081 <= 0.01"
    assert decision.best_index == 2


def test_perfect_loss_threshold_differs_by_task() -> None:
    history = curve([0.6, 0.35], [0.6, 0.3])
    text = decide(history, TEXT)
    assert text.stop and text.reason is not None and text.reason.startswith("perfect loss")
    assert not decide(history, INSTRUCTION).stop


# --- overfitting --------------------------------------------------------------------------------------------------


def test_overfitting_stops_and_names_gap_and_best_step() -> None:
    decision = decide(OVERFIT, INSTRUCTION)
    assert decision.stop
    assert decision.reason is not None
    assert decision.reason.startswith("overfitting")
    assert "12.5%" in decision.reason
    assert "step 10" in decision.reason  # the best (lowest validation loss) evaluation is kept
    assert decision.best_index == 0


def test_overfitting_needs_gap_over_threshold() -> None:
    small_gap = curve([1.0, 0.9, 0.86], [0.85, 0.87, 0.90])  # gap 4.7%
    assert not decide(small_gap, INSTRUCTION).stop
    # the text threshold is 20%: 12.5% is not enough there, 28.6% is
    assert not decide(OVERFIT, TEXT).stop
    assert decide(OVERFIT_TEXT, TEXT).stop


def test_overfitting_needs_a_rising_trend_over_three_evaluations() -> None:
    # only two evaluations: no trend yet, however wide the gap
    assert not decide(curve([1.0, 0.5], [0.85, 0.9]), INSTRUCTION).stop
    # val fell, then rose at the last evaluation only: the 3-point slope is still downward
    one_uptick = curve([1.0, 0.9, 0.8, 0.6], [1.0, 0.9, 0.7, 0.8])
    assert (one_uptick[-1].val_loss or 0) / one_uptick[-1].train_loss - 1 > 0.10
    assert not decide(one_uptick, INSTRUCTION).stop


def test_overfitting_is_not_judged_without_validation() -> None:
    history = curve([1.0, 1.1, 1.2])
    decision = decide(history, INSTRUCTION)
    assert decision.reason is None or not decision.reason.startswith("overfitting")


# --- patience -----------------------------------------------------------------------------------------------------


def test_patience_instruction_stops_after_three() -> None:
    assert not decide(FLAT[:4], INSTRUCTION).stop  # 2 evaluations since the best
    decision = decide(FLAT[:5], INSTRUCTION)
    assert decision.stop
    assert decision.reason is not None and decision.reason.startswith("no improvement in 3 evaluations")
    assert (decision.best_index, decision.evals_since_best, decision.patience_left) == (1, 3, 0)


def test_patience_text_needs_five() -> None:
    assert not decide(FLAT[:6], TEXT).stop
    partial = decide(FLAT[:6], TEXT)
    assert (partial.evals_since_best, partial.patience_left) == (4, 1)
    decision = decide(FLAT, TEXT)
    assert decision.stop
    assert decision.reason is not None and "no improvement in 5 evaluations" in decision.reason


def test_tiny_improvements_do_not_reset_patience() -> None:
    # each step improves 0.01%: below min_delta, so the first evaluation stays the best
    history = curve([1.0] * 4, [1.0, 0.9999, 0.9998, 0.9997])
    decision = decide(history, INSTRUCTION)
    assert decision.best_index == 0
    assert decision.stop


# --- perplexity explosion -----------------------------------------------------------------------------------------


def test_perplexity_explosion_stops_text() -> None:
    decision = decide(EXPLOSION, TEXT)
    assert decision.stop
    assert decision.reason is not None and decision.reason.startswith("perplexity explosion")
    assert "148.4" in decision.reason


def test_high_start_that_falls_is_not_an_explosion() -> None:
    history = curve([5.2, 4.9, 4.7], [5.0, 4.8, 4.6])
    assert never_stops(history, TEXT)


def test_perplexity_is_only_a_text_rule() -> None:
    assert not decide(EXPLOSION, INSTRUCTION).stop


def test_huge_loss_does_not_overflow() -> None:
    decision = decide(curve([2.0, 2.0], [2.0, 1e6]), TEXT)
    assert decision.stop
    assert decision.reason is not None and "inf" in decision.reason


def test_nan_loss_stops_as_diverged() -> None:
    decision = decide(curve([1.0, math.nan], [1.0, math.nan]), INSTRUCTION)
    assert decision.stop
    assert decision.reason is not None and decision.reason.startswith("diverged")
    assert decision.best_index == 0


# --- force epochs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "history"),
    [
        ("instruction", PERFECT),
        ("instruction", OVERFIT),
        ("instruction", FLAT),
        ("text-generation", OVERFIT_TEXT),
        ("text-generation", FLAT),
        ("text-generation", EXPLOSION),
        ("instruction", curve([1.0, math.nan])),
    ],
)
def test_force_epochs_never_stops_but_still_reports(task: str, history: list[Evaluation]) -> None:
    assert decide(history, rules_for_task(task)).stop  # the curve does trip a rule normally
    forced = rules_for_task(task, force_epochs=True)
    assert never_stops(history, forced)
    decision = decide(history, forced)
    assert decision.reason is None
    assert decision == dataclasses.replace(decide(history, rules_for_task(task)), stop=False, reason=None)


def test_force_epochs_reports_best() -> None:
    decision = decide(FLAT, rules_for_task("instruction", force_epochs=True))
    assert (decision.best_index, decision.evals_since_best, decision.patience_left) == (1, 5, 0)


# --- best index and no validation ---------------------------------------------------------------------------------


def test_best_index_is_lowest_validation_loss() -> None:
    history = curve([1.0, 0.9, 0.8, 0.7], [1.0, 0.7, 0.75, 0.72])
    decision = decide(history, INSTRUCTION)
    assert (decision.best_index, decision.evals_since_best, decision.patience_left) == (1, 2, 1)
    assert not decision.stop


def test_empty_history() -> None:
    decision = decide([], INSTRUCTION)
    assert not decision.stop
    assert (decision.best_index, decision.evals_since_best, decision.patience_left) == (None, 0, 3)


def test_without_validation_train_loss_is_watched() -> None:
    falling = curve([2.0, 1.5, 1.2, 1.3])
    decision = decide(falling, INSTRUCTION)
    assert not decision.stop
    assert decision.best_index == 2
    perfect = decide(curve([1.0, 0.005]), INSTRUCTION)
    assert perfect.stop
    assert perfect.reason == "perfect loss: train loss 0.005 <= 0.01"
    stalled = decide(curve([1.0, 1.0, 1.0, 1.0]), INSTRUCTION)
    assert stalled.stop and stalled.reason is not None and "best train loss 1 at step 10" in stalled.reason


# --- adaptive -----------------------------------------------------------------------------------------------------


def test_adapt_needs_two_evaluations() -> None:
    state = AdaptiveState.start(100)
    assert adapt(curve([1.0], [1.0]), state) == (state, None)
    assert (state.lr_scale, state.eval_interval, state.base_eval_interval) == (1.0, 100, 100)


def test_adapt_rising_halves_lr_and_interval() -> None:
    state, note = adapt(curve([1.0, 0.9], [1.0, 1.05]), AdaptiveState.start(100))
    assert (state.lr_scale, state.eval_interval) == (0.5, 50)
    assert note is not None and "rose" in note and "every 50 steps" in note


def test_adapt_rising_respects_floors() -> None:
    rising = curve([1.0, 0.9], [1.0, 1.2])
    state = AdaptiveState.start(100)
    for _ in range(10):
        state, _ = adapt(rising, state)
    assert state.lr_scale == pytest.approx(0.1)
    assert state.eval_interval == 25  # base // 4
    assert adapt(rising, state) == (state, None)  # nothing left to change
    small = AdaptiveState.start(2)
    for _ in range(3):
        small, _ = adapt(rising, small)
    assert small.eval_interval == 1


def test_adapt_plateau_cuts_lr() -> None:
    plateau = curve([1.0, 1.0, 1.0], [1.0, 0.996, 0.995])
    state, note = adapt(plateau, AdaptiveState.start(100))
    assert state.lr_scale == pytest.approx(0.7)
    assert state.eval_interval == 100
    assert note is not None and "plateau" in note
    for _ in range(20):
        state, _ = adapt(plateau, state)
    assert state.lr_scale == pytest.approx(0.1)


def test_adapt_fast_improvement_widens_interval_up_to_cap() -> None:
    fast = curve([1.0, 0.8], [1.0, 0.8])
    state, note = adapt(fast, AdaptiveState.start(100))
    assert (state.eval_interval, state.lr_scale) == (150, 1.0)
    assert note is not None and "every 150 steps" in note
    for _ in range(10):
        state, _ = adapt(fast, state)
    assert state.eval_interval == 400  # 4 x base
    tiny, _ = adapt(fast, AdaptiveState.start(1))
    assert tiny.eval_interval == 2


def test_adapt_steady_progress_changes_nothing() -> None:
    steady = curve([1.0, 0.95, 0.9], [1.0, 0.95, 0.9])  # ~5% per evaluation
    state = AdaptiveState.start(100)
    assert adapt(steady, state) == (state, None)


def test_adapt_without_validation_uses_train_loss() -> None:
    state, _ = adapt(curve([1.0, 1.1]), AdaptiveState.start(100))
    assert state.lr_scale == 0.5


# --- plot -----------------------------------------------------------------------------------------------------------


def train_points(n: int = 200, start: float = 3.0, end: float = 0.5) -> list[tuple[int, float]]:
    return [(s, end + (start - end) * math.exp(-s / 40) + 0.05 * math.sin(s)) for s in range(1, n + 1)]


@pytest.mark.parametrize("with_val", [True, False])
def test_plot_history_writes_png(tmp_path: Path, with_val: bool) -> None:
    evaluations = [
        Evaluation(step=s, train_loss=0.5 + 2.5 * math.exp(-s / 40), val_loss=(0.7 + 2.0 * math.exp(-s / 50)))
        if with_val
        else Evaluation(step=s, train_loss=0.5 + 2.5 * math.exp(-s / 40), val_loss=None)
        for s in range(25, 201, 25)
    ]
    best = decide(evaluations, INSTRUCTION).best_index
    out = tmp_path / "run" / "training_history.png"
    assert plot_history(train_points(), evaluations, best, out, "test run") == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["training_history.png"]  # no temp file left behind
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the host user, not mkstemp's 0600


def test_plot_history_log_scale_overwrite_and_empty(tmp_path: Path) -> None:
    out = tmp_path / "training_history.png"
    wide = train_points(start=40.0, end=0.01)  # spans > 20x: log scale
    plot_history(wide, curve([30.0, 0.1], [30.0, 0.2], every=100), 1, out, "wide")
    first = out.read_bytes()
    plot_history([], [], None, out, "empty")  # overwrites in place
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert out.read_bytes() != first
    plot_history([(1, math.nan), (2, 1.0)], [], None, out, "nan")
    assert [p.name for p in tmp_path.iterdir()] == ["training_history.png"]


def test_smooth_keeps_length_and_level() -> None:
    assert smooth([2.0] * 50) == [2.0] * 50
    noisy = [1.0 + (0.1 if i % 2 else -0.1) for i in range(100)]
    smoothed = smooth(noisy, window=10)
    assert len(smoothed) == 100
    assert max(abs(v - 1.0) for v in smoothed[5:-5]) < 0.02
    assert smooth([], window=3) == []
