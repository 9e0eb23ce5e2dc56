"""The training planner: model, GPU and data facts plus the user's flags in, one `TrainingPlan` out.

`plan` is pure (no torch, no I/O): every decision is recorded with a one-line reason, so `llmbox train` can
show why it chose what it chose, and the same inputs always give the same plan.

Memory model (bytes, one device). B = micro-batch size in sequences, S = max_seq_length, h = hidden size,
q/kv = query/key-value projection widths, I = MLP width a token passes through, L = layers, V = vocabulary,
a = bytes per activation (2 in bf16/fp16, also under 8-bit and 4-bit loading, which compute in 16-bit; 4 in
fp32 on CPU). The activation constants were calibrated against the tensors autograd saves for SmolLM2- and
GPT-2-shaped models with peft LoRA (torch 2.13, transformers 5, peft 0.21):

  weights      16-bit: n_params x 2; fp32: n_params x 4; 8-bit: linear params x 1 + embeddings/head x 2;
               4-bit NF4: linear params x 0.55 (4 bits plus double-quantized block constants) + embeddings/head
               x 2 -- bitsandbytes quantizes linear layers only, the embeddings and lm_head stay 16-bit
  LoRA         lora_params = L x sum over adapted linear layers of r x (in + out);
               training state = lora_params x (4 fp32 weights + 4 fp32 grads + optimizer state: 8 for AdamW,
               2 for 8-bit AdamW, ~1 for factored Adafactor)
  activations  per token and layer, kept for backward:
                 a x (2q + 2kv + 3I)            gated MLP (Llama-style: q, k, v, attention out; gate, up, act)
                 a x (2q + 2kv + 5I + 4h)       GPT-2 style (GELU's intermediates and dropout masks)
               + 4 x 2h                         RMSNorm/LayerNorm inputs, upcast to fp32
               + d x (8 if a = 2 else 4)        d = summed input widths of the adapted layers: peft casts each
                                                input to the fp32 adapter dtype and LoRA dropout copies it
               + 3 x heads x S x a              only for families without flash/SDPA kernels (scores, softmax,
                                                dropout), the one term that grows with S
               with gradient checkpointing each layer keeps only what the checkpoint saves (measured ~4 x h x a
               per token and layer) and one layer's full activations are live at a time while it is recomputed
  logits       V x 12 per token: the loss keeps 16-bit logits, an fp32 copy and the log-softmax (8 bytes), and
               backward adds their fp32 gradient; an engine that chunks the loss needs less (an upper bound)
  total        weights + LoRA state + B x S x (activations + logits)

The budget is free GPU memory x 0.85 minus 512 MiB for the CUDA context and allocator. On CPU the budget is
available RAM x 0.85 when known (unbounded otherwise) and a forward/backward pass holds at most
CPU_TOKENS_PER_PASS[precision] tokens (one sequence at least): on CPU, small passes keep the working set in
cache, which measured faster as well as lighter (SmolLM2, benchmarks/: in fp32, 4096 -> 1024 tokens per pass
took a step from 112 to 150-168 tokens/s and its peak memory from 12.2 to 3.6 GB). bf16-mixed halves the
activations and multiplies faster in larger products: there 2048-token packed passes measured 1.1x 768-token
padded ones (272-290 vs 246-260 tokens/s), and 3072 or 4096 were no faster (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

from llmbox import distribution
from llmbox.distribution import Strategy
from llmbox.errors import UserError
from llmbox.facts import DataFacts, GpuFacts, HostFacts, LinearShape, ModelFacts
from llmbox_handlers import Handler, handler_by_name

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
LORA_DROPOUT = 0.05
SAVE_TOTAL_LIMIT = 3
DEFAULT_SEED = 42
# Held-out validation: a tenth of the data, but no more than this many examples (evaluation time adds up).
VALIDATION_FRACTION = 0.1
MAX_VALIDATION_EXAMPLES = 2000
MIN_EXAMPLES_FOR_SPLIT = 10
CIRCULAR_BATCH_GROWTH = 2.0

# (epochs, evaluations per epoch, learning-rate factor) per mode
_MODE_RULES: dict[str, tuple[int | None, int, float]] = {
    "slow": (5, 2, 0.5),
    "medium": (3, 4, 1.0),
    "fast": (1, 8, 2.0),
    "non-stop": (None, 2, 0.3),
    "adaptive": (3, 4, 1.0),
}
# Upper bounds (exclusive, in parameters) of the LoRA rank bands.
_RANK_BANDS: tuple[tuple[float, int], ...] = ((1e9, 8), (3e9, 16), (7e9, 32), (13e9, 64), (30e9, 128))
_TOP_RANK = 256
_OPTIMIZER_STATE_BYTES: dict[str, float] = {
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
    strategy: str | None = None  # ddp or fsdp2 with several processes (default: the planner's)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model's numbers for the chosen plan (bytes). `budget_bytes=None`: unknown (CPU)."""

    free_bytes: int | None
    budget_bytes: int | None
    weights_bytes: int
    lora_params: int
    lora_state_bytes: int
    activation_bytes: int
    logits_bytes: int
    total_bytes: int


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
    world_size: int = 1
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


# --- small pure rules --------------------------------------------------------------------------------------


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.1f} GiB"


def _billions(n_params: int) -> str:
    if n_params >= 1e9:
        return f"{n_params / 1e9:.2f}B"
    return f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}K"


def lora_rank_for(n_params: int) -> int:
    """Bigger models get more rank: the adapter should stay a similar fraction of what it adapts."""
    for upper, rank in _RANK_BANDS:
        if n_params < upper:
            return rank
    return _TOP_RANK


def base_learning_rate(n_params: int) -> float:
    """LoRA/QLoRA learning rate before the mode factor: large models need gentler steps."""
    if n_params < 1e9:
        return 2e-4
    if n_params <= 13e9:
        return 1e-4
    return 5e-5


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


def weight_bytes(model: ModelFacts, quant: Quant, param_bytes: int) -> int:
    """Bytes of the frozen base weights; quantization touches linear layers only."""
    if quant == "none":
        return model.n_params * param_bytes
    unquantized = (model.embedding_params + model.head_params) * 2
    per_param = 1.0 if quant == "8bit" else NF4_BYTES_PER_PARAM
    return int(model.quantizable_params * per_param) + unquantized


def adapted_linears(model: ModelFacts, targets: tuple[str, ...] | None) -> tuple[LinearShape, ...]:
    """The layer's linear layers LoRA wraps; a target list naming none of them falls back to all of them."""
    if targets is None:
        return model.layer_linears
    chosen = tuple(s for s in model.layer_linears if s.name in targets)
    return chosen or model.layer_linears


def lora_param_count(model: ModelFacts, targets: tuple[str, ...] | None, rank: int) -> int:
    per_layer = sum(rank * (s.in_features + s.out_features) for s in adapted_linears(model, targets))
    return model.n_layers * per_layer


def lora_state_bytes(lora_params: int, optimizer: str) -> int:
    return int(lora_params * (4 + 4 + _OPTIMIZER_STATE_BYTES[optimizer]))


def activation_bytes_per_token(
    model: ModelFacts,
    targets: tuple[str, ...] | None,
    act_bytes: int,
    checkpointing: bool,
    seq: int,
    eager_attention: bool,
) -> int:
    """Activations kept for backward, per token of a micro-batch, summed over layers (see the module docstring)."""
    h = model.hidden_size
    q, kv = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    inter = model.active_intermediate_size
    tensors = 2 * q + 2 * kv + (3 * inter if model.gated_mlp else 5 * inter + 4 * h)
    lora_inputs = sum(s.in_features for s in adapted_linears(model, targets))
    one_layer = act_bytes * tensors + 4 * 2 * h + lora_inputs * (8 if act_bytes == 2 else 4)
    if eager_attention:
        one_layer += 3 * model.n_heads * seq * act_bytes
    if checkpointing:
        return model.n_layers * 4 * h * act_bytes + one_layer
    return model.n_layers * one_layer


def logits_bytes_per_token(model: ModelFacts) -> int:
    return model.vocab_size * LOGIT_BYTES_PER_VOCAB_ENTRY


def _largest_power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


# --- memory fitting ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """One way to load and train the model, priced per the memory model."""

    quant: Quant
    rank: int
    optimizer: str
    strategy: Strategy
    fixed_bytes: int  # weights + LoRA state (this process's share of them under FSDP2)
    weights_bytes: int
    lora_params: int
    lora_state_bytes: int
    act_per_token: dict[bool, int]  # by gradient checkpointing on/off
    logits_per_token: int

    def per_sequence(self, seq: int, checkpointing: bool) -> int:
        return seq * (self.act_per_token[checkpointing] + self.logits_per_token)

    def need(self, seq: int, batch: int, checkpointing: bool) -> int:
        return self.fixed_bytes + batch * self.per_sequence(seq, checkpointing)

    def max_batch(self, budget: int | None, seq: int, checkpointing: bool) -> int | None:
        """Most sequences per micro-batch that fit; `None` when the budget is unknown."""
        if budget is None:
            return None
        return max(0, (budget - self.fixed_bytes) // self.per_sequence(seq, checkpointing))


def _price(
    model: ModelFacts,
    targets: tuple[str, ...] | None,
    quant: Quant,
    rank: int,
    optimizer: str,
    param_bytes: int,
    seq: int,
    eager_attention: bool,
    strategy: Strategy = "single",
    world_size: int = 1,
) -> _Setup:
    weights = weight_bytes(model, quant, param_bytes)
    n_lora = lora_param_count(model, targets, rank)
    state = lora_state_bytes(n_lora, optimizer)
    fixed = weights + state
    if strategy == "fsdp2":
        whole = (model.embedding_params + model.head_params) * (param_bytes if quant == "none" else 2)
        fixed = distribution.sharded_bytes(weights, whole, state, model.n_layers, world_size)
    return _Setup(
        quant=quant,
        rank=rank,
        optimizer=optimizer,
        strategy=strategy,
        fixed_bytes=fixed,
        weights_bytes=weights,
        lora_params=n_lora,
        lora_state_bytes=state,
        act_per_token={
            ckpt: activation_bytes_per_token(model, targets, param_bytes, ckpt, seq, eager_attention)
            for ckpt in (False, True)
        },
        logits_per_token=logits_bytes_per_token(model),
    )


# --- the planner -------------------------------------------------------------------------------------------


class _Notes:
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.warnings: list[str] = []

    def why(self, key: str, reason: str) -> None:
        self.reasons[key] = reason

    def warn(self, message: str) -> None:
        self.warnings.append(message)


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
    if flags.strategy is not None and (flags.nproc_per_node or 1) == 1:
        raise UserError(f"--strategy {flags.strategy} spreads training over processes: give --nproc-per-node 2 or more")
    if flags.lora_dropout is not None and not 0 <= flags.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1) (got {flags.lora_dropout})")
    if flags.learning_rate is not None and not flags.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive (got {flags.learning_rate})")
    if flags.overfitting_threshold is not None and not flags.overfitting_threshold > 0:
        raise UserError(f"--overfitting-threshold must be positive (got {flags.overfitting_threshold})")
    if flags.validation_split is not None and not 0 <= flags.validation_split < 1:
        raise UserError(f"--validation-split must be in [0, 1) (got {flags.validation_split})")


def _choose_seq_length(model: ModelFacts, handler: Handler, data: DataFacts, flags: PlanFlags, notes: _Notes) -> int:
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


def _choose_validation(data: DataFacts, flags: PlanFlags, notes: _Notes) -> tuple[float, int, int]:
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


def _rank(model: ModelFacts, flags: PlanFlags, notes: _Notes) -> int:
    if flags.lora_r is not None:
        notes.why("lora_r", "--lora-r")
        return flags.lora_r
    rank = lora_rank_for(model.n_params)
    notes.why("lora_r", f"rank {rank} for a {_billions(model.n_params)}-parameter model")
    return rank


def _precision(
    gpu: GpuFacts | None, handler: Handler, host: HostFacts | None, asked: str | None, notes: _Notes
) -> Precision:
    if asked == "fp32":
        notes.why("precision", "--precision fp32")
        return "fp32"
    if gpu is None:
        return _cpu_precision(host, asked, notes)
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


def _cpu_precision(host: HostFacts | None, asked: str | None, notes: _Notes) -> Precision:
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


def _default_optimizer(quant: Quant, on_gpu: bool) -> str:
    # paged 8-bit AdamW pages optimizer state out under memory spikes: the QLoRA recipe
    return "paged_adamw_8bit" if quant == "4bit" and on_gpu else "adamw_torch"


@dataclass(frozen=True)
class _Device:
    """Where training runs and how much of its memory the plan may use (`None`: unknown)."""

    gpu: GpuFacts | None
    free: int | None
    budget: int | None
    where: str

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None


def _device(gpus: Sequence[GpuFacts], host: HostFacts | None, notes: _Notes) -> _Device:
    if gpus:
        # ties go to the lower index, the one CUDA calls device 0 when all are visible
        gpu = max(gpus, key=lambda g: (g.free_bytes, -g.index))
        where = f"GPU {gpu.index} ({gpu.name}, {gib(gpu.free_bytes)} free)"
        one_of = f"the most free memory of {len(gpus)} GPUs; " if len(gpus) > 1 else ""
        notes.why("device", f"{where}: {one_of}plan for one GPU with a {1 - GPU_MARGIN:.0%} margin")
        budget = int(gpu.free_bytes * GPU_MARGIN) - CUDA_CONTEXT_BYTES
        return _Device(gpu, gpu.free_bytes, budget, where)
    free = host.cpu_memory_bytes if host is not None else None
    notes.why("device", "no GPU found: training on CPU (slow; fine for small models)")
    if free is None:
        return _Device(None, None, None, "system memory")
    return _Device(None, free, int(free * GPU_MARGIN), f"system memory ({gib(free)} available)")


def _candidates(flags: PlanFlags, on_gpu: bool) -> list[Quant]:
    """Ways to load the weights, in order of preference: 16-bit quality first, 4-bit when it must."""
    if flags.method == "qlora":
        return ["4bit"]
    if flags.use_8bit:
        return ["8bit"]
    if flags.method == "lora" or not on_gpu:
        return ["none"]
    return ["none", "4bit"]


def _ranks_to_try(rank: int, flags: PlanFlags) -> list[int]:
    """The chosen rank, then (when the planner chose it) smaller ones down to 8, before giving up."""
    ranks = [rank]
    while flags.lora_r is None and ranks[-1] > 8:
        ranks.append(ranks[-1] // 2)
    return ranks


def _weights_label(quant: Quant, param_bytes: int) -> str:
    if quant == "4bit":
        return "QLoRA (4-bit weights)"
    if quant == "8bit":
        return "8-bit weights"
    return "fp32 weights" if param_bytes == 4 else "16-bit weights"


def _fit_setup(
    model: ModelFacts,
    handler: Handler,
    flags: PlanFlags,
    rank: int,
    seq: int,
    precision: Precision,
    device: _Device,
    notes: _Notes,
    world_size: int = 1,
) -> _Setup:
    """The first load method, rank and (with several processes) strategy whose minimal training (batch 1) fits,
    else a UserError with numbers."""
    param_bytes = 4 if precision in ("fp32", "bf16-mixed") else 2
    can_checkpoint = handler.supports_gradient_checkpointing
    quants = _candidates(flags, device.on_gpu)
    smallest: _Setup | None = None
    for try_rank in _ranks_to_try(rank, flags):
        for quant in quants:
            optimizer = flags.optimizer or _default_optimizer(quant, device.on_gpu)
            for strategy in distribution.strategies(world_size, flags.strategy):
                setup = _price(
                    model, handler.target_modules, quant, try_rank, optimizer, param_bytes, seq,
                    not handler.supports_flash_attention, strategy, world_size,
                )  # fmt: skip
                smallest = setup
                if device.budget is None or setup.need(seq, 1, can_checkpoint) <= device.budget:
                    _explain_method(setup, flags, model, rank, param_bytes, device, notes)
                    return setup
    assert smallest is not None and device.free is not None and device.budget is not None
    needed = smallest.need(seq, 1, can_checkpoint)
    extras = [_weights_label(smallest.quant, param_bytes), f"LoRA rank {smallest.rank}", "batch size 1"]
    extras.append(f"max_seq_length {seq}")
    if can_checkpoint:
        extras.append("gradient checkpointing")
    if device.on_gpu and (flags.method == "lora" or flags.use_8bit):
        hint = "; try --method qlora"
    elif smallest.fixed_bytes > device.budget:
        hint = f"; the weights and LoRA state alone need {gib(smallest.fixed_bytes)}: use a smaller model"
    else:
        hint = "; a smaller --max-seq-length may fit"
    raise UserError(
        f"the {_billions(model.n_params)}-parameter model does not fit: it needs about {gib(needed)} with "
        f"{', '.join(extras)}, but {device.where} leaves {gib(max(device.budget, 0))} usable{hint}"
    )


def _explain_method(
    setup: _Setup,
    flags: PlanFlags,
    model: ModelFacts,
    asked_rank: int,
    param_bytes: int,
    device: _Device,
    notes: _Notes,
) -> None:
    weights = gib(setup.weights_bytes)
    if setup.quant == "4bit" and flags.method == "qlora":
        notes.why("method", f"--method qlora: 4-bit NF4 weights ({weights})")
    elif setup.quant == "4bit":
        sixteen = gib(model.n_params * param_bytes)
        notes.why("method", f"16-bit weights ({sixteen}) plus training state do not fit {device.where}: QLoRA")
        notes.warn(
            f"switched to QLoRA (4-bit weights, {weights}): 16-bit weights ({sixteen}) do not fit {device.where}"
        )
    elif setup.quant == "8bit":
        notes.why("method", f"--use-8bit: LoRA on 8-bit weights ({weights})")
    elif flags.method == "lora":
        notes.why("method", f"--method lora: LoRA on {_weights_label(setup.quant, param_bytes)} ({weights})")
    else:
        notes.why("method", f"LoRA on {_weights_label(setup.quant, param_bytes)} ({weights}) fits {device.where}")
    if setup.rank != asked_rank:
        notes.warn(f"LoRA rank lowered from {asked_rank} to {setup.rank} so the training state fits {device.where}")
        notes.why("lora_r", f"rank {asked_rank} for this size does not fit {device.where}: lowered to {setup.rank}")


def _effective_batch_goal(flags: PlanFlags, n_train: int) -> int:
    if flags.batch_size is not None and flags.gradient_accumulation_steps is not None:
        return flags.batch_size * flags.gradient_accumulation_steps
    # ~16 examples per optimizer step; a tiny dataset caps it (a step should not need more than one epoch)
    return min(DEFAULT_EFFECTIVE_BATCH, n_train)


def _checkpointing(
    setup: _Setup, handler: Handler, flags: PlanFlags, seq: int, budget: int | None, notes: _Notes
) -> bool:
    wanted = flags.batch_size or 1
    fits_plain = setup.max_batch(budget, seq, checkpointing=False)
    if not handler.supports_gradient_checkpointing:
        checkpointing, why = False, f"the {handler.name} handler does not support it"
    elif setup.quant == "4bit":
        checkpointing, why = True, "always with QLoRA (activations dominate once weights are 4-bit)"
    elif fits_plain is None or fits_plain >= wanted:
        checkpointing, why = False, "activations fit without recomputation"
    else:
        checkpointing, why = True, f"activations for {wanted} sequence(s) of {seq} tokens do not fit otherwise"
    notes.why("gradient_checkpointing", why)
    return checkpointing


def _batch(
    setup: _Setup,
    flags: PlanFlags,
    seq: int,
    device: _Device,
    precision: Precision,
    mean_tokens: float,
    checkpointing: bool,
    goal: int,
    notes: _Notes,
) -> tuple[int, int, int, int]:
    """(micro-batch size, gradient accumulation steps, largest micro-batch that fits, tokens per forward pass)."""
    fits = setup.max_batch(device.budget, seq, checkpointing)
    if device.on_gpu:
        assert fits is not None
        max_batch, limit_why = max(1, fits), f"{max(1, fits)} sequence(s) of {seq} tokens fit"
        forward_tokens = max_batch * seq
    else:
        # CPU: throughput, not memory, is the limit, and small passes are the fastest (see the module docstring)
        per_pass = CPU_TOKENS_PER_PASS.get(precision, CPU_TOKENS_PER_PASS["fp32"])
        # passes, not micro-batches, hold activations here (a micro-batch runs as passes of at most `per_pass`
        # tokens), so a micro-batch takes about as many examples of the mean length as one pass holds
        typical = max(1, min(seq, math.ceil(mean_tokens)))
        max_batch, forward_tokens = max(1, per_pass // typical), max(seq, per_pass)
        limit_why = f"CPU passes hold at most {per_pass} tokens in {precision} ({typical} per example on average)"
        if fits is not None and fits * seq < forward_tokens:
            max_batch, limit_why = max(1, fits), f"{max(1, fits)} sequence(s) of {seq} tokens fit in memory"
            forward_tokens = max_batch * seq
    if flags.batch_size is not None:
        batch = flags.batch_size
        notes.why("batch_size", "--batch-size")
        if fits is not None and batch > fits:
            notes.warn(f"--batch-size {batch} is more than the {fits} sequence(s) estimated to fit: may run out")
    else:
        per_step = math.ceil(goal / flags.gradient_accumulation_steps) if flags.gradient_accumulation_steps else goal
        batch = _largest_power_of_two_at_most(min(max_batch, per_step))
        notes.why("batch_size", f"{limit_why}; the largest power of two up to {per_step}")
    if flags.gradient_accumulation_steps is not None:
        accumulation = flags.gradient_accumulation_steps
        notes.why("gradient_accumulation_steps", "--gradient-accumulation-steps")
    else:
        accumulation = max(1, math.ceil(goal / batch))
        notes.why("gradient_accumulation_steps", f"reach an effective batch of ~{goal} examples")
    notes.why("max_forward_tokens", f"{limit_why}: a longer micro-batch runs as several forward/backward passes")
    return batch, accumulation, max_batch, forward_tokens


def _learning_rate(model: ModelFacts, mode: str, flags: PlanFlags, notes: _Notes) -> float:
    if flags.learning_rate is not None:
        notes.why("learning_rate", "--learning-rate")
        return flags.learning_rate
    base = base_learning_rate(model.n_params)
    factor = _MODE_RULES[mode][2]
    notes.why(
        "learning_rate",
        f"{base:g} for a {_billions(model.n_params)}-parameter model, x{factor:g} for {mode} mode",
    )
    return base * factor


def _epochs(mode: str, flags: PlanFlags, notes: _Notes) -> int | None:
    if flags.epochs is not None:
        notes.why("epochs", "--epochs")
        return flags.epochs
    if flags.circular:
        notes.why("epochs", f"circular: up to {flags.max_circular_epochs} passes, stopping at a perfect loss")
        return flags.max_circular_epochs
    epochs = _MODE_RULES[mode][0]
    if epochs is None:
        if flags.force_epochs:
            raise UserError("--force-epochs runs exactly the epochs asked, but non-stop mode has none: add --epochs")
        notes.why("epochs", "non-stop: until stopped (Ctrl-C) or an auto-stop rule fires")
    else:
        notes.why("epochs", f"{mode} mode")
    return epochs


def _auto_stop(
    data: DataFacts, flags: PlanFlags, n_eval: int, notes: _Notes
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
    notes = _Notes()
    handler = handler_by_name(model.handler)
    notes.why("handler", model.handler_reason)
    mode = cast(Mode, flags.mode or "medium")
    notes.why("mode", "--mode" if flags.mode else "default")

    device = _device(gpus, host, notes)
    if not device.on_gpu:
        for asked, what in (
            (flags.method == "qlora", "4-bit loading"),
            (flags.use_8bit, "8-bit loading"),
            (flags.optimizer in BNB_OPTIMIZERS, f"the {flags.optimizer} optimizer"),
        ):
            if asked:
                notes.warn(f"{what} on CPU needs a bitsandbytes build with CPU support (the engine checks)")

    precision = _precision(device.gpu, handler, host, flags.precision, notes)
    targets = handler.target_modules
    notes.why("target_modules", f"the {handler.name} handler" if targets else "every linear layer but the output head")
    rank = _rank(model, flags, notes)
    seq = _choose_seq_length(model, handler, data, flags, notes)
    validation_split, n_train, n_eval = _choose_validation(data, flags, notes)

    world_size = flags.nproc_per_node or 1
    if not device.on_gpu and world_size > 1 and device.budget is not None:
        # the processes share the machine's memory
        device = replace(device, budget=device.budget // world_size,
                                     where=f"{device.where} shared by {world_size} processes")  # fmt: skip
    setup = _fit_setup(model, handler, flags, rank, seq, precision, device, notes, world_size)
    if flags.lora_alpha is not None:
        alpha = flags.lora_alpha
        notes.why("lora_alpha", "--lora-alpha")
    else:
        alpha = 2 * setup.rank
        notes.why("lora_alpha", "2 x rank: a scale of 2 is the usual LoRA default")
    if flags.lora_dropout is not None:
        notes.why("lora_dropout", "--lora-dropout")
    else:
        notes.why("lora_dropout", "light regularisation for small datasets")
    if flags.optimizer:
        notes.why("optimizer", "--optimizer")
    elif setup.optimizer == "paged_adamw_8bit":
        notes.why("optimizer", "paged 8-bit AdamW: the QLoRA recipe")
    else:
        notes.why("optimizer", "AdamW (torch): the default")

    goal = _effective_batch_goal(flags, n_train)
    checkpointing = _checkpointing(setup, handler, flags, seq, device.budget, notes)
    batch, accumulation, max_batch, forward_tokens = _batch(
        setup, flags, seq, device, precision, data.mean_tokens, checkpointing, goal, notes
    )
    effective = batch * accumulation
    steps_per_epoch = max(1, math.ceil(n_train / effective))

    learning_rate = _learning_rate(model, mode, flags, notes)
    epochs = _epochs(mode, flags, notes)
    if flags.max_steps is not None:
        notes.why("max_steps", "--max-steps")
    if flags.circular:
        evals_per_epoch = 1
        max_batch = min(max_batch, n_train)
        notes.why("eval_steps", "circular: evaluate after every pass over the data")
        notes.why("batch_growth", f"circular: micro-batch x{CIRCULAR_BATCH_GROWTH:g} per pass, up to {max_batch}")
    else:
        evals_per_epoch = _MODE_RULES[mode][1]
        notes.why("eval_steps", f"{mode} mode: {evals_per_epoch} evaluation(s) per epoch of {steps_per_epoch} steps")
    eval_steps = max(1, steps_per_epoch // evals_per_epoch)
    auto_stop, perfect_loss, overfitting, patience, perplexity_limit = _auto_stop(data, flags, n_eval, notes)
    if flags.force_epochs:
        notes.why("epochs", f"--force-epochs: exactly {epochs} epoch(s)")
    seed = flags.seed if flags.seed is not None else DEFAULT_SEED
    notes.why("seed", "--seed" if flags.seed is not None else "default")
    notes.why("save_total_limit", f"keep the {SAVE_TOTAL_LIMIT} latest numbered checkpoints")
    param_bytes = 4 if precision in ("fp32", "bf16-mixed") else 2
    weights_label = f"{_weights_label(setup.quant, param_bytes)} ({gib(setup.weights_bytes)})"
    per_process = gib(setup.need(seq, 1, checkpointing))
    asked = flags.strategy is not None
    notes.why(
        "strategy", distribution.why(setup.strategy, world_size, device.on_gpu, weights_label, per_process, asked)
    )

    activations = min(batch * seq, forward_tokens) * setup.act_per_token[checkpointing]
    logits = min(batch * seq, forward_tokens) * setup.logits_per_token
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
        lora_dropout=flags.lora_dropout if flags.lora_dropout is not None else LORA_DROPOUT,
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
        reasons=notes.reasons,
        warnings=tuple(notes.warnings),
    )
