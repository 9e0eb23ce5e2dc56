"""Modes and evaluation: learning rate, epochs, the validation split and the auto-stop thresholds."""

from __future__ import annotations

import math

from llmbox.errors import UserError
from llmbox.facts import DataFacts, ModelFacts
from llmbox.planning.terms import (
    CIRCULAR_LR_FACTOR,
    MAX_VALIDATION_EXAMPLES,
    MIN_EXAMPLES_FOR_SPLIT,
    MODE_RULES,
    TASK_THRESHOLDS,
    VALIDATION_FRACTION,
    Notes,
    PlanFlags,
    billions,
)


def base_learning_rate(n_params: int) -> float:
    """LoRA/QLoRA learning rate before the mode factor: large models need gentler steps."""
    if n_params < 1e9:
        return 2e-4
    if n_params <= 13e9:
        return 1e-4
    return 5e-5


def choose_validation(data: DataFacts, flags: PlanFlags, notes: Notes) -> tuple[float, int, int]:
    """(validation_split, training examples, validation examples)."""
    if data.n_val > 0:
        if flags.validation_split:
            notes.warn(f"--validation-split ignored: a separate validation set ({data.n_val} examples) is given")
        notes.why("validation_split", f"a separate validation set of {data.n_val} examples")
        return 0.0, data.n_train, data.n_val
    if flags.validation_split is not None:
        split, why = flags.validation_split, "--validation-split"
    elif flags.circular:
        split, why = 0.0, "circular: every example is trained on, and the training set is what is evaluated"
    elif data.n_train < MIN_EXAMPLES_FOR_SPLIT:
        split, why = 0.0, f"too few examples ({data.n_train}) to hold any out"
    else:
        split = min(VALIDATION_FRACTION, MAX_VALIDATION_EXAMPLES / data.n_train)
        why = f"hold out {split:.0%} of {data.n_train} examples"
        if split < VALIDATION_FRACTION:
            why = f"hold out {MAX_VALIDATION_EXAMPLES} of {data.n_train} examples (capped: evaluation time adds up)"
    held_out = min(data.n_train - 1, math.ceil(data.n_train * split)) if split > 0 else 0
    notes.why("validation_split", why)
    return split, data.n_train - held_out, held_out


def learning_rate(model: ModelFacts, mode: str, flags: PlanFlags, notes: Notes) -> float:
    if flags.learning_rate is not None:
        notes.why("learning_rate", "--learning-rate")
        return flags.learning_rate
    base = base_learning_rate(model.n_params)
    factor = MODE_RULES[mode][2]
    why = f"{base:g} for a {billions(model.n_params)}-parameter model, x{factor:g} for {mode} mode"
    if flags.circular:
        # memorising a few examples takes few, large steps; the usual rate is tuned for generalising
        factor *= CIRCULAR_LR_FACTOR
        why += f", x{CIRCULAR_LR_FACTOR:g} for circular mode (memorising a small dataset)"
    notes.why("learning_rate", why)
    return base * factor


def epochs(mode: str, flags: PlanFlags, notes: Notes) -> int | None:
    if flags.epochs is not None:
        notes.why("epochs", "--epochs")
        return flags.epochs
    if flags.circular:
        notes.why("epochs", f"circular: up to {flags.max_circular_epochs} passes, stopping at a perfect loss")
        return flags.max_circular_epochs
    epochs = MODE_RULES[mode][0]
    if epochs is None:
        if flags.force_epochs:
            raise UserError("--force-epochs runs exactly the epochs asked, but non-stop mode has none: add --epochs")
        notes.why("epochs", "non-stop: until stopped (Ctrl-C) or an auto-stop rule fires")
    else:
        notes.why("epochs", f"{mode} mode")
    return epochs


def auto_stop(
    data: DataFacts, flags: PlanFlags, n_eval: int, notes: Notes
) -> tuple[bool, float | None, float | None, int | None, float | None]:
    """(auto_stop, perfect_loss, overfitting_threshold, patience, perplexity_limit)."""
    if flags.force_epochs:
        notes.why("auto_stop", "--force-epochs: every auto-stop rule is off")
        return False, None, None, None, None
    rules = TASK_THRESHOLDS[data.task]
    notes.why("auto_stop", f"{data.task} thresholds")
    notes.why("perfect_loss", f"{data.task}: a training loss this low means the data is learned")
    overfitting: float | None = flags.overfitting_threshold or rules.overfitting_threshold
    patience: int | None = flags.patience or rules.patience
    if n_eval == 0:
        notes.warn("no validation examples: overfitting and patience checks are off")
        notes.why("overfitting_threshold", "off: no validation examples")
        notes.why("patience", "off: no validation examples")
        overfitting = patience = None
    else:
        notes.why("overfitting_threshold", "--overfitting-threshold" if flags.overfitting_threshold else data.task)
        notes.why("patience", "--patience" if flags.patience else f"{data.task}: evaluations without improvement")
    if rules.perplexity_limit is not None:
        notes.why("perplexity_limit", "text generation: stop when validation perplexity explodes")
    return True, rules.perfect_loss, overfitting, patience, rules.perplexity_limit
