"""The training planner: model, GPU and data facts plus the user's flags in, one `TrainingPlan` out.

`plan` is pure (no torch, no I/O): every decision is recorded with a one-line reason, so `llmbox train` can
show why it chose what it chose, and the same inputs always give the same plan.

The rules live in `llmbox.planning`, one topic a module: `memory` (the memory model), `fitting` (device,
precision, quantization, rank, replicas or shards), `batches` (length, batch, accumulation, checkpointing),
`schedule` (modes, learning rate, epochs, validation, auto-stop) and `distribution` (DDP or FSDP2). This module
holds the flags, the plan and `plan` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

from llmbox.errors import UserError
from llmbox.facts import DataFacts, GpuFacts, HostFacts, ModelFacts
from llmbox.planning import batches, distribution, fitting, schedule
from llmbox.planning.distribution import Strategy
from llmbox.planning.memory import (
    MemoryEstimate,
)
from llmbox.planning.terms import (
    CIRCULAR_BATCH_GROWTH,
    DEFAULT_SEED,
    LORA_DROPOUT,
    METHODS,
    MODE_RULES,
    MODES,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_TOTAL_LIMIT,
    Method,
    Mode,
    Notes,
    PlanFlags,
    Precision,
    gib,
)
from llmbox_handlers import handler_by_name

__all__ = ["PlanFlags", "TrainingPlan", "plan"]  # the flags in, the plan out


@dataclass(frozen=True)
class TrainingPlan:
    device: Literal["cuda", "cpu"]
    gpu_index: int | None
    gpu_name: str | None
    handler: str
    method: Method
    load_in_4bit: bool
    load_in_8bit: bool
    precision: Precision
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...] | None
    max_seq_length: int
    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    max_batch_size: int
    # a micro-batch holding more (rows x longest) is run as several forward/backward passes: the examples per
    # optimizer step stay as planned, the memory stays bounded whatever --batch-size asks for
    max_forward_tokens: int
    gradient_checkpointing: bool
    learning_rate: float
    optimizer: str
    mode: Mode
    adaptive: bool
    circular: bool
    batch_growth: float
    epochs: int | None
    max_steps: int | None
    n_train: int
    n_val: int
    validation_split: float
    steps_per_epoch: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    auto_stop: bool
    perfect_loss: float | None
    overfitting_threshold: float | None
    patience: int | None
    perplexity_limit: float | None
    seed: int
    memory: MemoryEstimate
    strategy: Strategy = "single"
    # CPU: one LoRA dropout mask per layer input, shared by the projections reading it (train/cpu_speed.py)
    shared_lora_dropout: bool = False
    world_size: int = 1
    nnodes: int = 1  # machines; world_size / nnodes processes on each
    reasons: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (`--json`)."""
        data = asdict(self)
        data["reasons"] = dict(self.reasons)
        data["warnings"] = list(self.warnings)
        if self.target_modules is not None:
            data["target_modules"] = list(self.target_modules)
        return data


def _check_flags(flags: PlanFlags) -> None:
    if flags.mode is not None and flags.mode not in MODES:
        raise UserError(f"unknown mode {flags.mode!r} (choose from {', '.join(MODES)})")
    if flags.optimizer is not None and flags.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {flags.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if flags.method is not None and flags.method not in METHODS:
        raise UserError(f"unknown method {flags.method!r} (choose from {', '.join(METHODS)})")
    if flags.precision is not None and flags.precision not in PRECISIONS:
        raise UserError(f"unknown precision {flags.precision!r} (choose from {', '.join(PRECISIONS)})")
    if flags.method == "qlora" and flags.use_8bit:
        raise UserError("--method qlora loads weights in 4-bit and --use-8bit in 8-bit: choose one")
    positive = {
        "--epochs": flags.epochs,
        "--batch-size": flags.batch_size,
        "--gradient-accumulation-steps": flags.gradient_accumulation_steps,
        "--lora-r": flags.lora_r,
        "--lora-alpha": flags.lora_alpha,
        "--max-seq-length": flags.max_seq_length,
        "--max-steps": flags.max_steps,
        "--patience": flags.patience,
        "--max-circular-epochs": flags.max_circular_epochs,
        "--nproc-per-node": flags.nproc_per_node,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if flags.strategy is not None and flags.strategy not in distribution.STRATEGIES:
        raise UserError(f"unknown strategy {flags.strategy!r} (choose from {', '.join(distribution.STRATEGIES)})")
    if flags.strategy is not None and (flags.nproc_per_node or 1) * (flags.nnodes or 1) == 1:
        raise UserError(f"--strategy {flags.strategy} spreads training over processes: give --nproc-per-node 2 or more")
    if flags.lora_dropout is not None and not 0 <= flags.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1) (got {flags.lora_dropout})")
    if flags.learning_rate is not None and not flags.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive (got {flags.learning_rate})")
    if flags.overfitting_threshold is not None and not flags.overfitting_threshold > 0:
        raise UserError(f"--overfitting-threshold must be positive (got {flags.overfitting_threshold})")
    if flags.validation_split is not None and not 0 <= flags.validation_split < 1:
        raise UserError(f"--validation-split must be in [0, 1) (got {flags.validation_split})")


def plan(
    model: ModelFacts,
    gpus: Sequence[GpuFacts],
    data: DataFacts,
    flags: PlanFlags,
    host: HostFacts | None = None,
) -> TrainingPlan:
    """Every training setting, each with its reason. Raises UserError when nothing fits."""
    _check_flags(flags)
    if data.n_train < 1:
        raise UserError("no training examples")
    notes = Notes()
    handler = handler_by_name(model.handler)
    notes.why("handler", model.handler_reason)
    mode = cast(Mode, flags.mode or "medium")
    notes.why("mode", "--mode" if flags.mode else "default")

    device = fitting.device(gpus, host, notes)
    precision = fitting.precision(device.gpu, handler, host, flags.precision, notes)
    targets = handler.target_modules
    notes.why("target_modules", f"the {handler.name} handler" if targets else "every linear layer but the output head")
    rank = fitting.rank(model, flags, notes)
    seq = batches.choose_seq_length(model, handler, data, flags, notes)
    validation_split, n_train, n_eval = schedule.choose_validation(data, flags, notes)

    per_node = flags.nproc_per_node or 1
    world_size = per_node * (flags.nnodes or 1)
    if not device.on_gpu and per_node > 1 and device.budget is not None:
        # the processes on one machine share its memory
        device = replace(device, budget=device.budget // per_node,
                                     where=f"{device.where} shared by {per_node} processes")  # fmt: skip
    setup = fitting.fit_setup(model, handler, flags, rank, seq, precision, device, notes, world_size)
    if flags.lora_alpha is not None:
        alpha = flags.lora_alpha
        notes.why("lora_alpha", "--lora-alpha")
    else:
        alpha = 2 * setup.rank
        notes.why("lora_alpha", "2 x rank: a scale of 2 is the usual LoRA default")
    dropout = flags.lora_dropout if flags.lora_dropout is not None else LORA_DROPOUT
    if flags.lora_dropout is not None:
        notes.why("lora_dropout", "--lora-dropout")
    else:
        notes.why("lora_dropout", "light regularisation for small datasets")
    shared_dropout = not device.on_gpu and dropout > 0
    if shared_dropout:
        notes.why("shared_lora_dropout", "CPU: one dropout mask per layer input, shared by the projections that read "
                  "it (q/k/v, gate/up): each still drops at the planned rate, about 15% of a step saved")  # fmt: skip
    if flags.optimizer == "paged_adamw_8bit" and not device.on_gpu:
        notes.why("optimizer", "--optimizer: bitsandbytes pages to host memory from a GPU only; here it runs unpaged")
    elif flags.optimizer:
        notes.why("optimizer", "--optimizer")
    elif setup.optimizer == "paged_adamw_8bit":
        notes.why("optimizer", "paged 8-bit AdamW: the QLoRA recipe")
    elif setup.quant == "4bit":
        notes.why("optimizer", "AdamW (torch): paged 8-bit AdamW pages to host memory, which a CPU run already uses")
    else:
        notes.why("optimizer", "AdamW (torch): the default")

    goal = batches.effective_batch_goal(flags, n_train)
    checkpointing = batches.checkpointing(setup, handler, flags, seq, device, precision, notes)
    batch, accumulation, max_batch, forward_tokens = batches.batch(
        setup, flags, seq, device, precision, data.mean_tokens, checkpointing, goal, notes
    )
    effective = batch * accumulation
    steps_per_epoch = max(1, math.ceil(n_train / effective))

    learning_rate = schedule.learning_rate(model, mode, flags, notes)
    epochs = schedule.epochs(mode, flags, notes)
    if flags.max_steps is not None:
        notes.why("max_steps", "--max-steps")
    if flags.circular:
        evals_per_epoch = 1
        max_batch = min(max_batch, n_train)
        notes.why("eval_steps", "circular: evaluate after every pass over the data")
        notes.why("batch_growth", f"circular: micro-batch x{CIRCULAR_BATCH_GROWTH:g} per pass, up to {max_batch}")
    else:
        evals_per_epoch = MODE_RULES[mode][1]
        notes.why("eval_steps", f"{mode} mode: {evals_per_epoch} evaluation(s) per epoch of {steps_per_epoch} steps")
    eval_steps = max(1, steps_per_epoch // evals_per_epoch)
    auto_stop, perfect_loss, overfitting, patience, perplexity_limit = schedule.auto_stop(data, flags, n_eval, notes)
    if flags.force_epochs:
        notes.why("epochs", f"--force-epochs: exactly {epochs} epoch(s)")
    seed = flags.seed if flags.seed is not None else DEFAULT_SEED
    notes.why("seed", "--seed" if flags.seed is not None else "default")
    notes.why("save_total_limit", f"keep the {SAVE_TOTAL_LIMIT} latest numbered checkpoints")
    param_bytes = 4 if precision in ("fp32", "bf16-mixed") else 2
    weights_label = f"{fitting.weights_label(setup.quant, param_bytes)} ({gib(setup.weights_bytes)})"
    per_process = gib(setup.need(seq, 1, checkpointing))
    asked = flags.strategy is not None
    notes.why(
        "strategy", distribution.why(setup.strategy, world_size, device.on_gpu, weights_label, per_process, asked)
    )

    # the largest pass the run will make: circular mode grows its micro-batch up to max_batch
    pass_tokens = min((max_batch if flags.circular else batch) * seq, forward_tokens)
    activations = pass_tokens * setup.act_per_token[checkpointing]
    logits = pass_tokens * setup.logits_per_token
    memory = MemoryEstimate(
        free_bytes=device.free,
        budget_bytes=device.budget,
        weights_bytes=setup.weights_bytes,
        lora_params=setup.lora_params,
        lora_state_bytes=setup.lora_state_bytes,
        activation_bytes=activations,
        logits_bytes=logits,
        total_bytes=setup.fixed_bytes + activations + logits,
    )
    return TrainingPlan(
        device="cuda" if device.gpu is not None else "cpu",
        gpu_index=device.gpu.index if device.gpu is not None else None,
        gpu_name=device.gpu.name if device.gpu is not None else None,
        handler=handler.name,
        method="qlora" if setup.quant == "4bit" else "lora",
        load_in_4bit=setup.quant == "4bit",
        load_in_8bit=setup.quant == "8bit",
        precision=precision,
        lora_r=setup.rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        shared_lora_dropout=shared_dropout,
        target_modules=targets,
        max_seq_length=seq,
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=effective,
        max_batch_size=max_batch if flags.circular else batch,
        max_forward_tokens=forward_tokens,
        gradient_checkpointing=checkpointing,
        learning_rate=learning_rate,
        optimizer=setup.optimizer,
        mode=mode,
        adaptive=mode == "adaptive",
        circular=flags.circular,
        batch_growth=CIRCULAR_BATCH_GROWTH if flags.circular else 1.0,
        epochs=epochs,
        max_steps=flags.max_steps,
        n_train=n_train,
        n_val=n_eval,
        validation_split=validation_split,
        steps_per_epoch=steps_per_epoch,
        eval_steps=eval_steps,
        save_steps=eval_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        auto_stop=auto_stop,
        perfect_loss=perfect_loss,
        overfitting_threshold=overfitting,
        patience=patience,
        perplexity_limit=perplexity_limit,
        seed=seed,
        memory=memory,
        strategy=setup.strategy,
        world_size=world_size,
        nnodes=flags.nnodes or 1,
        reasons=notes.reasons,
        warnings=tuple(notes.warnings),
    )
