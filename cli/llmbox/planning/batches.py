"""Sequence length, micro-batch, accumulation, the forward-pass token budget and gradient checkpointing."""

from __future__ import annotations

import math

from llmbox.facts import DataFacts, ModelFacts
from llmbox.planning.fitting import Device
from llmbox.planning.memory import Setup
from llmbox.planning.terms import (
    CIRCULAR_START_BATCH,
    CPU_TOKENS_PER_PASS,
    DEFAULT_EFFECTIVE_BATCH,
    Notes,
    PlanFlags,
    Precision,
)
from llmbox_handlers import Handler


def seq_bucket(n_tokens: int) -> int:
    """Round a token count up to 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, ...

    Powers of two and 1.5x powers of two: planning memory for 8192 tokens when the longest example has 300
    would waste most of the batch, and a bucket boundary keeps kernels on friendly sizes.
    """
    bucket = 64
    while bucket < n_tokens:
        half_step = bucket + bucket // 2
        if bucket >= 512 and half_step >= n_tokens:
            return half_step
        bucket *= 2
    return bucket


def choose_seq_length(model: ModelFacts, handler: Handler, data: DataFacts, flags: PlanFlags, notes: Notes) -> int:
    limit = model.max_positions
    if flags.max_seq_length is not None:
        if limit is not None and flags.max_seq_length > limit:
            notes.warn(f"--max-seq-length {flags.max_seq_length} is past the model's {limit} positions: using {limit}")
            notes.why("max_seq_length", f"the model's position limit ({limit}); --max-seq-length asked for more")
            return limit
        notes.why("max_seq_length", "--max-seq-length")
        return flags.max_seq_length
    caps = [(handler.max_seq_length, f"the {handler.name} handler's cap")]
    if limit is not None:
        caps.append((limit, "the model's position limit"))
    cap, cap_why = min(caps)
    if data.max_tokens <= 0:
        notes.why("max_seq_length", f"{cap_why} (no token statistics for the data)")
        return cap
    # One outlier should not double the memory plan: past 2x the p95, plan for the p95 and truncate the rest.
    basis, basis_why = data.max_tokens, f"the longest example ({data.max_tokens} tokens)"
    if data.p95_tokens > 0 and data.max_tokens > 2 * data.p95_tokens:
        basis, basis_why = data.p95_tokens, f"95% of examples (p95 {data.p95_tokens} tokens)"
    bucket = seq_bucket(basis)
    if bucket >= cap:
        chosen, why = cap, cap_why
    else:
        chosen, why = bucket, f"{basis_why} rounded up to a {bucket}-token bucket"
    if data.max_tokens > chosen:
        notes.warn(f"examples longer than {chosen} tokens are truncated (the longest has {data.max_tokens})")
    notes.why("max_seq_length", why)
    return chosen


def largest_power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def effective_batch_goal(flags: PlanFlags, n_train: int) -> int:
    if flags.batch_size is not None and flags.gradient_accumulation_steps is not None:
        return flags.batch_size * flags.gradient_accumulation_steps
    # ~16 examples per optimizer step; a tiny dataset caps it (a step should not need more than one epoch)
    return min(DEFAULT_EFFECTIVE_BATCH, n_train)


def cpu_tokens_per_pass(precision: Precision) -> int:
    return CPU_TOKENS_PER_PASS.get(precision, CPU_TOKENS_PER_PASS["fp32"])


def cpu_pass_tokens(seq: int, precision: Precision) -> int:
    """The most tokens one forward/backward pass holds on CPU (a longer micro-batch runs as several passes)."""
    return max(seq, cpu_tokens_per_pass(precision))


def checkpointing(
    setup: Setup, handler: Handler, flags: PlanFlags, seq: int, device: Device, precision: Precision, notes: Notes
) -> bool:
    wanted = flags.batch_size or 1
    if device.on_gpu:
        fits_plain = setup.max_batch(device.budget, seq, checkpointing=False)
        fits = fits_plain is None or fits_plain >= wanted
        wanted_what = f"{wanted} sequence(s) of {seq} tokens"
    else:  # passes, not micro-batches, hold activations on CPU
        tokens = cpu_pass_tokens(seq, precision)
        fits = device.budget is None or setup.need_tokens(tokens, checkpointing=False) <= device.budget
        wanted_what = f"a pass of {tokens} tokens"
    if not handler.supports_gradient_checkpointing:
        checkpointing, why = False, f"the {handler.name} handler does not support it"
    elif setup.quant == "4bit":
        checkpointing, why = True, "always with QLoRA (activations dominate once weights are 4-bit)"
    elif fits:
        checkpointing, why = False, "activations fit without recomputation"
    else:
        checkpointing, why = True, f"activations for {wanted_what} do not fit otherwise"
    notes.why("gradient_checkpointing", why)
    return checkpointing


def batch(
    setup: Setup,
    flags: PlanFlags,
    seq: int,
    device: Device,
    precision: Precision,
    mean_tokens: float,
    checkpointing: bool,
    goal: int,
    notes: Notes,
) -> tuple[int, int, int, int]:
    """(micro-batch size, gradient accumulation steps, largest micro-batch that fits, tokens per forward pass)."""
    fits = setup.max_batch(device.budget, seq, checkpointing)
    if device.on_gpu:
        assert fits is not None
        max_batch, limit_why = max(1, fits), f"{max(1, fits)} sequence(s) of {seq} tokens fit"
        forward_tokens = max_batch * seq
    else:
        # CPU: throughput, not memory, is the limit, and small passes are the fastest (see the module docstring)
        per_pass = cpu_tokens_per_pass(precision)
        # passes, not micro-batches, hold activations here (a micro-batch runs as passes of at most `per_pass`
        # tokens), so a micro-batch takes about as many examples of the mean length as one pass holds
        typical = max(1, min(seq, math.ceil(mean_tokens)))
        max_batch, forward_tokens = max(1, per_pass // typical), cpu_pass_tokens(seq, precision)
        limit_why = f"CPU passes hold at most {per_pass} tokens in {precision} ({typical} per example on average)"
        if fits is not None and fits * seq < forward_tokens:
            max_batch, limit_why = max(1, fits), f"{max(1, fits)} sequence(s) of {seq} tokens fit in memory"
            forward_tokens = max_batch * seq
    if flags.batch_size is not None:
        batch = flags.batch_size
        notes.why("batch_size", "--batch-size")
        if fits is not None and batch > fits:
            notes.warn(f"--batch-size {batch} is more than the {fits} sequence(s) estimated to fit: may run out")
    elif flags.circular:
        batch = max(1, min(CIRCULAR_START_BATCH, max_batch))
        notes.why("batch_size", f"circular: start at {batch} example(s) per step, grow every pass ({limit_why})")
    else:
        per_step = math.ceil(goal / flags.gradient_accumulation_steps) if flags.gradient_accumulation_steps else goal
        batch = largest_power_of_two_at_most(min(max_batch, per_step))
        notes.why("batch_size", f"{limit_why}; the largest power of two up to {per_step}")
    if flags.gradient_accumulation_steps is not None:
        accumulation = flags.gradient_accumulation_steps
        notes.why("gradient_accumulation_steps", "--gradient-accumulation-steps")
    elif flags.batch_size is not None or flags.circular:
        # --batch-size alone is the examples per optimizer step, as per_device_train_batch_size is in
        # transformers and TRL; circular mode grows its micro-batch instead of accumulating
        accumulation = 1
        why = "--batch-size is the examples per step" if flags.batch_size else "circular: the batch grows instead"
        notes.why("gradient_accumulation_steps", why)
    else:
        accumulation = max(1, math.ceil(goal / batch))
        notes.why("gradient_accumulation_steps", f"reach an effective batch of ~{goal} examples")
    notes.why("max_forward_tokens", f"{limit_why}: a longer micro-batch runs as several forward/backward passes")
    return batch, accumulation, max_batch, forward_tokens
