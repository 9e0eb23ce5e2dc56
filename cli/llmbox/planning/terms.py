"""The planner's vocabulary: what it decides between, its constants, and the notes that keep each reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["slow", "medium", "fast", "non-stop", "adaptive"]


Method = Literal["lora", "qlora"]


Quant = Literal["none", "8bit", "4bit"]


# bf16-mixed: fp32 weights, matmuls in bf16 under autocast (CPUs with native bf16); bf16/fp16: 16-bit weights
Precision = Literal["bf16", "fp16", "fp32", "bf16-mixed"]


PRECISIONS = ("auto", "fp32", "bf16-mixed")


MODES: tuple[str, ...] = ("slow", "medium", "fast", "non-stop", "adaptive")


OPTIMIZERS: tuple[str, ...] = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor")


METHODS: tuple[str, ...] = ("lora", "qlora")


BNB_OPTIMIZERS: tuple[str, ...] = ("adamw_bnb_8bit", "paged_adamw_8bit")


GiB = 1024**3


GPU_MARGIN = 0.85


CUDA_CONTEXT_BYTES = 512 * 1024**2


CPU_TOKENS_PER_PASS: dict[str, int] = {"fp32": 1024, "bf16-mixed": 2048}


DEFAULT_EFFECTIVE_BATCH = 16


NF4_BYTES_PER_PARAM = 0.55


LOGIT_BYTES_PER_VOCAB_ENTRY = 12


# CPU resident memory of a forward/backward pass, per token, as a multiple of (activations without gradient
# checkpointing + logits), by how the weights are held: glibc's malloc keeps the blocks a pass frees in its heap
# (its mmap threshold rises to the largest block freed), so resident memory follows what a pass allocates rather
# than what it keeps alive; quantized layers add their dequantized weights and 8-bit inputs. Measured with
# benchmarks/memory.py on SmolLM2 in fp32 (passes of up to 1024 tokens): 1.55, 1.7, 1.95 x the model's numbers.
CPU_PASS_RESIDENT: dict[str, float] = {"none": 1.55, "4bit": 1.7, "8bit": 1.95}
# bf16-mixed passes hold bf16 activations: this share of the fp32 figure (measured 0.57, 0.44 and 0.63 for
# lora, qlora and 8-bit in passes of up to 2048 tokens)
CPU_PRECISION_SHARE: dict[str, float] = {"fp32": 1.0, "bf16-mixed": 0.55}
# with gradient checkpointing a CPU pass keeps this share of the above (measured 0.64 for QLoRA): fewer live
# tensors, but the heap still grows with the recomputed layers' blocks
CPU_CHECKPOINTED_SHARE = 0.65


LORA_DROPOUT = 0.05


SAVE_TOTAL_LIMIT = 3


DEFAULT_SEED = 42


# Held-out validation: a tenth of the data, but no more than this many examples (evaluation time adds up).
VALIDATION_FRACTION = 0.1


MAX_VALIDATION_EXAMPLES = 2000


MIN_EXAMPLES_FOR_SPLIT = 10


CIRCULAR_BATCH_GROWTH = 2.0
# circular mode memorises a small dataset: it starts at micro-batches of this many examples, no accumulation,
# and a learning rate this many times the base (benchmarks/learn.py measured the time to a perfect loss)
CIRCULAR_START_BATCH = 4
CIRCULAR_LR_FACTOR = 10.0


# (epochs, evaluations per epoch, learning-rate factor) per mode
MODE_RULES: dict[str, tuple[int | None, int, float]] = {
    "slow": (5, 2, 0.5),
    "medium": (3, 4, 1.0),
    "fast": (1, 8, 2.0),
    "non-stop": (None, 2, 0.3),
    "adaptive": (3, 4, 1.0),
}


# Upper bounds (exclusive, in parameters) of the LoRA rank bands.
RANK_BANDS: tuple[tuple[float, int], ...] = ((1e9, 8), (3e9, 16), (7e9, 32), (13e9, 64), (30e9, 128))


TOP_RANK = 256


OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adamw_torch": 8,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 1,
}


@dataclass(frozen=True)
class TaskThresholds:
    perfect_loss: float
    overfitting_threshold: float
    patience: int
    perplexity_limit: float | None


TASK_THRESHOLDS: dict[str, TaskThresholds] = {
    "instruction": TaskThresholds(perfect_loss=0.01, overfitting_threshold=0.10, patience=3, perplexity_limit=None),
    "text-generation": TaskThresholds(perfect_loss=0.5, overfitting_threshold=0.20, patience=5, perplexity_limit=100),
}


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.1f} GiB"


def billions(n_params: int) -> str:
    if n_params >= 1e9:
        return f"{n_params / 1e9:.2f}B"
    return f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}K"


class Notes:
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.warnings: list[str] = []

    def why(self, key: str, reason: str) -> None:
        self.reasons[key] = reason

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@dataclass(frozen=True)
class PlanFlags:
    """What the user asked for. `None` means "let the planner choose"."""

    mode: str | None = None
    circular: bool = False
    max_circular_epochs: int = 100
    force_epochs: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    gradient_accumulation_steps: int | None = None
    optimizer: str | None = None
    method: str | None = None
    use_8bit: bool = False
    lora_r: int | None = None
    lora_alpha: int | None = None
    max_seq_length: int | None = None
    max_steps: int | None = None
    patience: int | None = None
    overfitting_threshold: float | None = None
    validation_split: float | None = None
    seed: int | None = None
    precision: str | None = None
    lora_dropout: float | None = None
    nproc_per_node: int | None = None  # training processes on this machine (default: one)
    nnodes: int | None = None  # machines, each running nproc_per_node processes (default: one)
    strategy: str | None = None  # ddp or fsdp2 with several processes (default: the planner's)
