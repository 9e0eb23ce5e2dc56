"""training_history.png: the loss curves of a run, with the best evaluation marked.

matplotlib is imported inside `plot_history` so importing the trainer does not pay for it, and the figure is
drawn on an Agg canvas of its own (no pyplot), so nothing global changes and no display is needed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from llmbox_engine.train.autostop import Evaluation, monitored

LOG_SCALE_RANGE = 20.0  # above this max/min ratio a linear axis flattens the end of the run into a line
SMOOTHING_POINTS = 30  # the smoothing window is 1/30 of the run: noise goes, the shape stays


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centred moving average; the window shrinks at the ends.

    Centred rather than an exponential average: an EMA lags behind a steeply falling curve, which makes the smoothed
    line sit visibly above the raw one early in a run.
    """
    if window is None:
        window = max(1, len(values) // SMOOTHING_POINTS)
    half = window // 2
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    out: list[float] = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _finite_points(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, loss) for step, loss in points if math.isfinite(loss)]


def plot_history(
    train_points: Sequence[tuple[int, float]],
    evaluations: Sequence[Evaluation],
    best_index: int | None,
    path: Path,
    title: str,
) -> Path:
    """Draw the losses to `path` (PNG), atomically: readers never see a half-written file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    # A NaN from a diverged step would break the smoothing and the axis limits.
    train = _finite_points(train_points)
    if train:
        steps = [s for s, _ in train]
        losses = [loss for _, loss in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (per step)")
        if len(train) > 1:
            ax.plot(steps, smooth(losses), color="tab:blue", linewidth=1.8, label="train loss (smoothed)")

    eval_train = _finite_points([(e.step, e.train_loss) for e in evaluations])
    if eval_train:
        ax.plot(*zip(*eval_train, strict=True), color="tab:orange", marker="o", markersize=4, label="train loss (eval)")
    eval_val = _finite_points([(e.step, e.val_loss) for e in evaluations if e.val_loss is not None])
    if eval_val:
        ax.plot(*zip(*eval_val, strict=True), color="tab:green", marker="s", markersize=4, label="validation loss")

    if best_index is not None and 0 <= best_index < len(evaluations):
        best = evaluations[best_index]
        loss = monitored(best)
        if math.isfinite(loss):
            ax.plot([best.step], [loss], marker="*", markersize=16, color="tab:red", linestyle="none", label="best")
            # Point the label into the plot so it is not cut off at the right edge.
            steps_seen = [s for s, _ in train] + [e.step for e in evaluations]
            right_half = best.step > (min(steps_seen) + max(steps_seen)) / 2
            ax.annotate(
                f"best: {loss:.4g} @ step {best.step}",
                xy=(best.step, loss),
                xytext=(-15 if right_half else 15, 20),
                textcoords="offset points",
                ha="right" if right_half else "left",
                arrowprops={"arrowstyle": "->", "color": "tab:red"},
                color="tab:red",
            )

    all_losses = [loss for _, loss in train + eval_train + eval_val]
    positive = [loss for loss in all_losses if loss > 0]
    if positive and len(positive) == len(all_losses) and max(positive) / min(positive) > LOG_SCALE_RANGE:
        ax.set_yscale("log")

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes it 0600; the engine may run as root in a container and the user must still read it.
            os.fchmod(f.fileno(), 0o644)
            fig.savefig(f, format="png")
        os.replace(tmp, path)  # noqa: PTH105 - same call as Path.replace; spelled out because atomicity is the point
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
