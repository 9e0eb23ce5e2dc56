"""Every CPU-only speed measure of training, in one place. Each is switched on by the plan (or, for the
allocator, by training on a CPU at all), and none changes what is trained unless the plan says so:

- forward passes of at most `plan.max_forward_tokens` tokens (the planner's CPU_TOKENS_PER_PASS): a small
  working set stays in cache; the examples per step are unchanged (the loop, `data/batching.split_to_budget`);
- `plan.precision == "bf16-mixed"` (CPUs with native bf16): matmuls in bf16 under autocast, and the frozen
  linear weights stored in bf16 once instead of cast on every pass (`model_setup.frozen_linears_to_bf16`);
- `plan.shared_lora_dropout`: one LoRA dropout mask per layer input, shared by the projections that read it,
  drawn four at a time from each random word (`shared_dropout`); each projection still drops at the planned
  rate, what changes is that sibling projections' masks are no longer independent;
- packed rows attended one example at a time with SDPA (`packed_attention`): no padding, the same numbers,
  chosen with the attention (`pipelines.py`);
- glibc malloc keeping freed blocks for reuse (`host_memory`): the training process only, numbers untouched.
"""

from __future__ import annotations

from typing import Any

from llmbox.plan import TrainingPlan
from llmbox_engine.train import shared_dropout
from llmbox_engine.train.host_memory import keep_freed_memory, release_freed_memory
from llmbox_engine.train.model_setup import frozen_linears_to_bf16


def prepare_process() -> None:
    """For a training process on a CPU: process-wide, so called at its entry, never inside a library call."""
    keep_freed_memory()


def prepare_model(model: Any, plan: TrainingPlan) -> None:
    """The planned measures that change the model once it is wrapped in LoRA."""
    if plan.precision == "bf16-mixed":
        frozen_linears_to_bf16(model)
    if plan.shared_lora_dropout:
        shared_dropout.share_lora_dropout(model, plan.lora_dropout)
    if plan.device == "cpu":
        release_freed_memory()  # loading's copies (and the fp32 weights just cast) would stay resident
