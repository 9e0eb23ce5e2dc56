"""What a training run prints: the plan, one status line per evaluation, the sample answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from llmbox.console import make_console
from llmbox.plan import TrainingPlan
from llmbox.planning.terms import gib
from llmbox_engine.train.memory_meter import MemoryUse

console = make_console()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plan_table(plan: TrainingPlan, model_name: str) -> Table:
    table = Table(title=f"Training plan for {model_name}", title_justify="left", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("why", style="dim")
    epochs = "until stopped" if plan.epochs is None else str(plan.epochs)
    cycles = f" (circular, batch x{plan.batch_growth:g} per cycle)" if plan.circular else ""
    rows: list[tuple[str, str, str]] = [
        ("device", plan.gpu_name or plan.device, plan.reasons.get("device", "")),
        ("processes", f"{plan.world_size}"
         + (f" = {plan.nnodes} nodes x {plan.world_size // plan.nnodes}" if plan.nnodes > 1 else "")
         + f" ({plan.strategy})", plan.reasons.get("strategy", "")),
        ("handler", plan.handler, plan.reasons.get("handler", "")),
        ("method", plan.method + (" (4-bit)" if plan.load_in_4bit else " (8-bit)" if plan.load_in_8bit else ""),
         plan.reasons.get("method", "")),
        ("precision", plan.precision, plan.reasons.get("precision", "")),
        ("LoRA", f"r={plan.lora_r} alpha={plan.lora_alpha} dropout={plan.lora_dropout}"
         + (" (one mask per layer input)" if plan.shared_lora_dropout else ""),
         plan.reasons.get("lora_r", "")),
        ("targets", ", ".join(plan.target_modules) if plan.target_modules else "all linear layers but the head",
         plan.reasons.get("target_modules", "")),
        ("max sequence length", str(plan.max_seq_length), plan.reasons.get("max_seq_length", "")),
        ("batch", f"{plan.batch_size} x {plan.gradient_accumulation_steps} accumulation = {plan.effective_batch_size}",
         plan.reasons.get("batch_size", "")),
        ("gradient checkpointing", "on" if plan.gradient_checkpointing else "off",
         plan.reasons.get("gradient_checkpointing", "")),
        ("learning rate", f"{plan.learning_rate:.2e}", plan.reasons.get("learning_rate", "")),
        ("optimizer", plan.optimizer, plan.reasons.get("optimizer", "")),
        ("mode", plan.mode + cycles, plan.reasons.get("mode", "")),
        ("epochs", epochs + (f", at most {plan.max_steps} steps" if plan.max_steps else ""),
         plan.reasons.get("epochs", "")),
        ("data", f"{plan.n_train} train / {plan.n_val} validation, {plan.steps_per_epoch} steps per epoch",
         plan.reasons.get("validation_split", "")),
        ("evaluation", f"every {plan.eval_steps} steps", plan.reasons.get("eval_steps", "")),
        ("auto-stop", _auto_stop(plan), plan.reasons.get("auto_stop", "")),
        ("memory", f"{gib(plan.memory.total_bytes)} estimated" + (" per process" if plan.world_size > 1 else "")
         + (f" of {gib(plan.memory.budget_bytes)} budget" if plan.memory.budget_bytes else ""), ""),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def _auto_stop(plan: TrainingPlan) -> str:
    if not plan.auto_stop:
        return "off (--force-epochs)"
    parts = [f"perfect loss {plan.perfect_loss}"]
    if plan.overfitting_threshold is not None:
        parts.append(f"overfitting {plan.overfitting_threshold:.0%}")
    if plan.patience is not None:
        parts.append(f"patience {plan.patience}")
    if plan.perplexity_limit:
        parts.append(f"perplexity > {plan.perplexity_limit:g}")
    return ", ".join(parts)


def print_plan(plan: TrainingPlan, model_name: str) -> None:
    console.print(plan_table(plan, model_name))
    for warning in plan.warnings:
        console.print(f"warning: {warning}", style="yellow")


def memory_line(use: MemoryUse) -> str:
    """The measured peak beside the plan's estimate, so a user sees how far to trust the plan's numbers."""
    where = "allocated on the GPU" if use.device == "cuda" else "resident memory added by the model and training"
    return (
        f"memory: peak {_size(use.training_bytes)} {where} (plan estimated {_size(use.estimate_bytes)}; "
        f"{use.training_bytes / max(1, use.estimate_bytes):.2f}x)"
    )


def _size(n_bytes: int) -> str:
    return gib(n_bytes) if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def status_line(
    *,
    number: int,
    elapsed: float,
    step: int,
    epoch: float,
    train_loss: float,
    val_loss: float | None,
    show_perplexity: bool,
    best: float | None,
    patience_left: int | None,
    patience: int | None,
    tokens_per_s: float,
) -> str:
    parts = [
        f"eval {number:>3}",
        format_duration(elapsed),
        f"step {step}",
        f"epoch {epoch:.2f}",
        f"train {train_loss:.4f}",
    ]
    if val_loss is not None:
        parts.append(f"val {val_loss:.4f}")
        if show_perplexity:
            parts.append(f"ppl {math.exp(min(val_loss, 50)):.2f}")
    if best is not None:
        parts.append(f"best {best:.4f}")
    if patience is not None and patience_left is not None:
        parts.append(f"patience {patience_left}/{patience}")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    return " | ".join(parts)


def samples_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="Sample answers with the adapter", title_justify="left", show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column("reference", ratio=2)
    table.add_column("model", ratio=2)
    for row in rows:
        table.add_row(*(_clip(row[key]) for key in ("prompt", "reference", "answer")))
    return table


def _clip(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class StepBar:
    """A progress bar between evaluations, on a terminal only: logs get the status lines alone."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, transient=True, disable=not self.enabled,
        )  # fmt: skip
        self.task = self.progress.add_task("training", total=1)

    def __enter__(self) -> StepBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def restart(self, total: int) -> None:
        self.progress.reset(self.task, total=max(1, total), description="to next evaluation")

    def advance(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, description=f"loss {loss:.4f}")
