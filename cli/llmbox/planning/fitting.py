"""Where training runs and how the weights are held: the device and the memory it may use, precision,
16-bit or 8/4-bit weights, the LoRA rank and, with several processes, replicas or shards. The first way that
fits a micro-batch of one wins; nothing fits: a UserError with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmbox.errors import UserError
from llmbox.facts import GpuFacts, HostFacts, ModelFacts
from llmbox.planning import distribution
from llmbox.planning.memory import Setup, price
from llmbox.planning.terms import (
    CUDA_CONTEXT_BYTES,
    GPU_MARGIN,
    RANK_BANDS,
    TOP_RANK,
    Notes,
    PlanFlags,
    Precision,
    Quant,
    billions,
    gib,
)
from llmbox_handlers import Handler


def lora_rank_for(n_params: int) -> int:
    """Bigger models get more rank: the adapter should stay a similar fraction of what it adapts."""
    for upper, rank in RANK_BANDS:
        if n_params < upper:
            return rank
    return TOP_RANK


def rank(model: ModelFacts, flags: PlanFlags, notes: Notes) -> int:
    if flags.lora_r is not None:
        notes.why("lora_r", "--lora-r")
        return flags.lora_r
    rank = lora_rank_for(model.n_params)
    notes.why("lora_r", f"rank {rank} for a {billions(model.n_params)}-parameter model")
    return rank


def precision(
    gpu: GpuFacts | None, handler: Handler, host: HostFacts | None, asked: str | None, notes: Notes
) -> Precision:
    if asked == "fp32":
        notes.why("precision", "--precision fp32")
        return "fp32"
    if gpu is None:
        return cpu_precision(host, asked, notes)
    if asked == "bf16-mixed":
        raise UserError("--precision bf16-mixed is for CPUs: on a GPU, auto trains in bf16 where the GPU has it")
    major, minor = gpu.compute_capability
    cc = f"{major}.{minor}"
    if gpu.compute_capability >= (8, 0):
        lead = "the handler prefers bf16 and " if handler.prefers_bf16 else ""
        notes.why("precision", f"{lead}compute capability {cc} supports bf16 (fp16's range without its overflows)")
        return "bf16"
    if handler.prefers_bf16:
        notes.warn(
            f"{handler.name} models train best in bf16, but {gpu.name} (compute capability {cc}) has no bf16: "
            "using fp16, which may overflow (watch for nan losses)"
        )
    notes.why("precision", f"compute capability {cc} has no bf16")
    return "fp16"


def cpu_precision(host: HostFacts | None, asked: str | None, notes: Notes) -> Precision:
    if asked == "bf16-mixed":
        notes.why("precision", "--precision bf16-mixed")
        return "bf16-mixed"
    if host is not None and host.cpu_bf16:
        notes.why(
            "precision",
            "CPU with native bf16 (AVX512-BF16/AMX): fp32 weights, bf16 matmuls (about 1.3x faster; --precision fp32)",
        )
        return "bf16-mixed"
    notes.why("precision", "CPU without native bf16: fp32 (16-bit matmuls would be slower)")
    return "fp32"


def default_optimizer(quant: Quant, on_gpu: bool) -> str:
    # paged 8-bit AdamW pages optimizer state out to host memory under spikes: the QLoRA recipe on a GPU. A CPU
    # has nothing to page to, and the LoRA state 8 bits would save is small beside the base weights.
    return "paged_adamw_8bit" if quant == "4bit" and on_gpu else "adamw_torch"


@dataclass(frozen=True)
class Device:
    """Where training runs and how much of its memory the plan may use (`None`: unknown)."""

    gpu: GpuFacts | None
    free: int | None
    budget: int | None
    where: str

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None


def device(gpus: Sequence[GpuFacts], host: HostFacts | None, notes: Notes) -> Device:
    if gpus:
        # ties go to the lower index, the one CUDA calls device 0 when all are visible
        gpu = max(gpus, key=lambda g: (g.free_bytes, -g.index))
        where = f"GPU {gpu.index} ({gpu.name}, {gib(gpu.free_bytes)} free)"
        one_of = f"the most free memory of {len(gpus)} GPUs; " if len(gpus) > 1 else ""
        notes.why("device", f"{where}: {one_of}plan for one GPU with a {1 - GPU_MARGIN:.0%} margin")
        budget = int(gpu.free_bytes * GPU_MARGIN) - CUDA_CONTEXT_BYTES
        return Device(gpu, gpu.free_bytes, budget, where)
    free = host.cpu_memory_bytes if host is not None else None
    notes.why("device", "no GPU found: training on CPU (slow; fine for small models)")
    if free is None:
        return Device(None, None, None, "system memory")
    return Device(None, free, int(free * GPU_MARGIN), f"system memory ({gib(free)} available)")


def candidates(flags: PlanFlags) -> list[Quant]:
    """Ways to load the weights, in order of preference: full-precision quality first, 4-bit when it must (on a
    GPU or a CPU alike: bitsandbytes runs on both)."""
    if flags.method == "qlora":
        return ["4bit"]
    if flags.use_8bit:
        return ["8bit"]
    if flags.method == "lora":
        return ["none"]
    return ["none", "4bit"]


def ranks_to_try(rank: int, flags: PlanFlags) -> list[int]:
    """The chosen rank, then (when the planner chose it) smaller ones down to 8, before giving up."""
    ranks = [rank]
    while flags.lora_r is None and ranks[-1] > 8:
        ranks.append(ranks[-1] // 2)
    return ranks


def weights_label(quant: Quant, param_bytes: int) -> str:
    if quant == "4bit":
        return "QLoRA (4-bit weights)"
    if quant == "8bit":
        return "8-bit weights"
    return "fp32 weights" if param_bytes == 4 else "16-bit weights"


def fit_setup(
    model: ModelFacts,
    handler: Handler,
    flags: PlanFlags,
    rank: int,
    seq: int,
    precision: Precision,
    device: Device,
    notes: Notes,
    world_size: int = 1,
) -> Setup:
    """The first load method, rank and (with several processes) strategy whose minimal training (batch 1) fits,
    else a UserError with numbers."""
    param_bytes = 4 if precision in ("fp32", "bf16-mixed") else 2
    can_checkpoint = handler.supports_gradient_checkpointing
    quants = candidates(flags)
    smallest: Setup | None = None
    for try_rank in ranks_to_try(rank, flags):
        for quant in quants:
            optimizer = flags.optimizer or default_optimizer(quant, device.on_gpu)
            for strategy in distribution.strategies(world_size, flags.strategy):
                setup = price(
                    model, handler.target_modules, quant, try_rank, optimizer, param_bytes, seq,
                    not handler.supports_flash_attention, strategy, world_size,
                    cpu_precision=None if device.on_gpu else precision,
                )  # fmt: skip
                smallest = setup
                if device.budget is None or setup.need(seq, 1, can_checkpoint) <= device.budget:
                    explain_method(setup, flags, model, rank, param_bytes, device, notes)
                    return setup
    assert smallest is not None and device.free is not None and device.budget is not None
    needed = smallest.need(seq, 1, can_checkpoint)
    extras = [weights_label(smallest.quant, param_bytes), f"LoRA rank {smallest.rank}", "batch size 1"]
    extras.append(f"max_seq_length {seq}")
    if can_checkpoint:
        extras.append("gradient checkpointing")
    if flags.method == "lora" or flags.use_8bit:
        hint = "; try --method qlora"
    elif smallest.fixed_bytes > device.budget:
        hint = f"; the weights and LoRA state alone need {gib(smallest.fixed_bytes)}: use a smaller model"
    else:
        hint = "; a smaller --max-seq-length may fit"
    raise UserError(
        f"the {billions(model.n_params)}-parameter model does not fit: it needs about {gib(needed)} with "
        f"{', '.join(extras)}, but {device.where} leaves {gib(max(device.budget, 0))} usable{hint}"
    )


def explain_method(
    setup: Setup,
    flags: PlanFlags,
    model: ModelFacts,
    asked_rank: int,
    param_bytes: int,
    device: Device,
    notes: Notes,
) -> None:
    weights = gib(setup.weights_bytes)
    if setup.quant == "4bit" and flags.method == "qlora":
        notes.why("method", f"--method qlora: 4-bit NF4 weights ({weights})")
    elif setup.quant == "4bit":
        full = f"{weights_label('none', param_bytes)} ({gib(model.n_params * param_bytes)})"
        notes.why("method", f"{full} plus training state do not fit {device.where}: QLoRA")
        notes.warn(f"switched to QLoRA (4-bit weights, {weights}): {full} do not fit {device.where}")
    elif setup.quant == "8bit":
        notes.why("method", f"--use-8bit: LoRA on 8-bit weights ({weights})")
    elif flags.method == "lora":
        notes.why("method", f"--method lora: LoRA on {weights_label(setup.quant, param_bytes)} ({weights})")
    else:
        notes.why("method", f"LoRA on {weights_label(setup.quant, param_bytes)} ({weights}) fits {device.where}")
    if setup.rank != asked_rank:
        notes.warn(f"LoRA rank lowered from {asked_rank} to {setup.rank} so the training state fits {device.where}")
        notes.why("lora_r", f"rank {asked_rank} for this size does not fit {device.where}: lowered to {setup.rank}")
