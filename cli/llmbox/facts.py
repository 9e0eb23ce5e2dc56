"""What the planner knows before training: the model (from config.json), the GPUs (from NVML), the host, the data.

Everything here is importable without torch. `model_facts_from_config` counts parameters from the config
alone, so the planner can size memory before any weight is read.

Parameter count (per decoder layer, h = hidden size, I = MLP intermediate size):
  attention  h x (heads x head_dim) for q and o, h x (kv_heads x head_dim) for k and v (+ biases where the
             family has them; GPT-2 fuses qkv into one h x 3h Conv1D)
  MLP        3 matrices h x I (gate, up, down) for Llama-style gated MLPs, 2 (h x 4h) for GPT-2;
             mixture-of-experts layers hold one MLP per expert plus a router (h x experts)
  norms      one weight vector per norm (and a bias for GPT-2's LayerNorm)
plus the token embedding (vocab x h), GPT-2's learned positions, the final norm, and an untied lm_head
(vocab x h) unless `tie_word_embeddings`. Multimodal configs (Gemma 3) count the language model from
`text_config` and add an estimate of the vision tower from `vision_config`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmbox.errors import UserError
from llmbox.model_facts import max_positions, text_config
from llmbox_handlers import match_handler

Task = Literal["instruction", "text-generation"]

# Values transformers fills in when a config.json leaves them out (Gemma 3 ships sparse text_configs).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "vocab_size": 262208,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
}
# LLaVA-style configs nest a text_config that keeps only what differs from the language model's own defaults
# (llava-1.5 names little more than the vocabulary): these are LlamaConfig's, filled in only for nested configs.
_NESTED_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
}
# Families whose lm_head shares the embedding matrix unless the config says otherwise.
_TIED_BY_DEFAULT = ("gpt2", "gemma", "gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class LinearShape:
    """One linear layer inside a decoder layer, named as peft's `target_modules` names it."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelFacts:
    """A model's size and shape, read from config.json.

    `embedding_params` (token and position embeddings) and `head_params` (0 when tied) are kept apart from
    the rest because 8-bit and 4-bit loading leave them in 16-bit. `layer_linears` lists one decoder layer's
    linear layers (dense MLP shapes for mixture-of-experts models) for LoRA sizing.
    """

    model_type: str
    handler: str
    handler_reason: str
    n_params: int
    embedding_params: int
    head_params: int
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    dtype: str
    tie_word_embeddings: bool
    gated_mlp: bool
    layer_linears: tuple[LinearShape, ...]
    n_experts: int = 1
    experts_per_token: int = 1

    @property
    def quantizable_params(self) -> int:
        """Parameters in linear layers, the ones bitsandbytes quantizes."""
        return self.n_params - self.embedding_params - self.head_params

    @property
    def active_intermediate_size(self) -> int:
        """MLP width a token actually passes through (mixture-of-experts routes each token to a few experts)."""
        return self.intermediate_size * min(self.experts_per_token, self.n_experts)


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as NVML sees it. `index` is NVML's (PCI bus order): the CUDA ordinal too when
    CUDA_DEVICE_ORDER=PCI_BUS_ID, which is how the engine should select it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class HostFacts:
    """The machine the engine runs on when there is no GPU. `None` means unknown."""

    cpu_memory_bytes: int | None = None
    # the CPU multiplies bf16 natively (AVX512-BF16 or AMX): a bf16 matmul runs at about twice the fp32 rate
    cpu_bf16: bool = False


@dataclass(frozen=True)
class DataFacts:
    """The training data as the planner needs it.

    `n_train` counts the examples available for training before any validation split; `n_val` counts a
    separate validation set (0 = none, and the plan holds out part of `n_train`). Token statistics are per
    example after the chat template is applied.
    """

    n_train: int
    n_val: int
    task: Task
    mean_tokens: float
    p95_tokens: int
    max_tokens: int


def _int(config: Mapping[str, Any], *keys: str) -> int | None:
    """The first positive integer under any of `keys` (configs name the same size differently per family)."""
    for key in keys:
        value = config.get(key)
        # bool is an int subclass; a stray `true` must not become a layer count of 1
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _int_or(config: Mapping[str, Any], default: int, *keys: str) -> int:
    value = _int(config, *keys)
    return default if value is None else value


def _required(config: Mapping[str, Any], what: str, *keys: str) -> int:
    value = _int(config, *keys)
    if value is None:
        raise UserError(f"config.json has no {what} ({' / '.join(keys)}): cannot size the model")
    return value


def _llama_layer(h: int, q_out: int, kv_out: int, inter: int, model_type: str) -> tuple[tuple[LinearShape, ...], bool]:
    """Linear shapes of a Llama-style layer (Phi-3 fuses qkv and gate/up) and whether q/k/v carry biases."""
    shapes: tuple[LinearShape, ...]
    if model_type == "phi3":
        shapes = (
            LinearShape("qkv_proj", h, q_out + 2 * kv_out),
            LinearShape("o_proj", q_out, h),
            LinearShape("gate_up_proj", h, 2 * inter),
            LinearShape("down_proj", inter, h),
        )
        return shapes, False
    shapes = (
        LinearShape("q_proj", h, q_out),
        LinearShape("k_proj", h, kv_out),
        LinearShape("v_proj", h, kv_out),
        LinearShape("o_proj", q_out, h),
        LinearShape("gate_proj", h, inter),
        LinearShape("up_proj", h, inter),
        LinearShape("down_proj", inter, h),
    )
    # Qwen2 hard-codes biases on q/k/v; the others follow `attention_bias`
    return shapes, model_type == "qwen2"


def _sum_weights(shapes: Iterable[LinearShape]) -> int:
    return sum(s.in_features * s.out_features for s in shapes)


def _vision_params(vision: Mapping[str, Any], text_hidden: int) -> int:
    """A ViT (SigLIP-style) tower plus its projection into the language model: a few percent of the model."""
    h = _int_or(vision, 768, "hidden_size")
    inter = _int_or(vision, 4 * h, "intermediate_size")
    layers = _int_or(vision, 12, "num_hidden_layers")
    patch = _int_or(vision, 16, "patch_size")
    image = _int_or(vision, 224, "image_size")
    per_layer = 4 * h * h + 2 * h * inter + 9 * h + inter  # q/k/v/o and fc1/fc2 with biases, two LayerNorms
    patches = (image // patch) ** 2
    return layers * per_layer + 3 * patch * patch * h + patches * h + h * text_hidden


def model_facts_from_config(config: dict[str, Any]) -> ModelFacts:
    """Size and shape of a model from its config.json (Llama, Mistral, Qwen2/3, Gemma 3, GPT-2, Phi-3 styles)."""
    top_type = str(config.get("model_type", ""))
    text = text_config(config)
    model_type = str(text.get("model_type") or ("gemma3_text" if top_type == "gemma3" else top_type))
    nested = _NESTED_TEXT_DEFAULTS.get(model_type, {}) if text is not config else {}
    cfg: dict[str, Any] = {**nested, **_FAMILY_DEFAULTS.get(model_type, {}), **text}

    h = _required(cfg, "hidden size", "hidden_size", "n_embd", "d_model")
    n_layers = _required(cfg, "layer count", "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _required(cfg, "attention head count", "num_attention_heads", "n_head")
    vocab = _required(cfg, "vocabulary size", "vocab_size")
    n_kv = _int_or(cfg, n_heads, "num_key_value_heads")
    head_dim = _int_or(cfg, h // n_heads, "head_dim")
    is_gpt2 = model_type == "gpt2"
    inter = _int_or(cfg, 4 * h, "n_inner" if is_gpt2 else "intermediate_size", "ffn_dim")
    tied_value = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    tied = bool(tied_value) if tied_value is not None else model_type in _TIED_BY_DEFAULT
    n_experts = _int_or(cfg, 1, "num_local_experts", "num_experts")
    experts_per_token = _int_or(cfg, n_experts, "num_experts_per_tok")

    embedding = vocab * h
    if is_gpt2:
        embedding += _int_or(cfg, 1024, "n_positions", "max_position_embeddings") * h
        shapes: tuple[LinearShape, ...] = (
            LinearShape("c_attn", h, 3 * h),
            LinearShape("c_proj", h, h),
            LinearShape("c_fc", h, inter),
            LinearShape("c_proj", inter, h),
        )
        # every Conv1D has a bias; two LayerNorms with weight and bias
        per_layer = _sum_weights(shapes) + 3 * h + h + inter + h + 4 * h
        final_norm = 2 * h
        gated = False
    else:
        expert_inter = _int_or(cfg, inter, "moe_intermediate_size")
        q_out, kv_out = n_heads * head_dim, n_kv * head_dim
        shapes, qkv_bias = _llama_layer(h, q_out, kv_out, expert_inter if n_experts > 1 else inter, model_type)
        attention = _sum_weights(s for s in shapes if not s.name.endswith(("gate_proj", "up_proj", "down_proj")))
        mlp_one = 3 * h * expert_inter
        if n_experts > 1:
            # one MLP per expert and a router; Qwen-MoE and Llama 4 add an always-on shared expert
            shared = _int_or(cfg, 0, "shared_expert_intermediate_size")
            if model_type.startswith("llama4"):
                shared = inter
            mlp = n_experts * mlp_one + h * n_experts + 3 * h * shared
        else:
            mlp = 3 * h * inter
        if qkv_bias or cfg.get("attention_bias") is True:
            attention += q_out + 2 * kv_out
        norms = 2 * h
        if model_type.startswith("gemma3"):
            norms = 4 * h + 2 * head_dim  # pre/post norms around attention and MLP, plus q/k norms
        elif model_type.startswith("qwen3"):
            norms += 2 * head_dim  # q/k norms
        per_layer = attention + mlp + norms
        final_norm = h
        gated = True
        if n_experts > 1:
            inter = expert_inter

    head = 0 if tied else vocab * h
    n_params = embedding + n_layers * per_layer + final_norm + head
    vision = config.get("vision_config")
    if isinstance(vision, dict) and text is not config:
        n_params += _vision_params(vision, h)

    match = match_handler(config)
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return ModelFacts(
        model_type=top_type or model_type,
        handler=match.handler.name,
        handler_reason=match.reason,
        n_params=n_params,
        embedding_params=embedding,
        head_params=head,
        n_layers=n_layers,
        hidden_size=h,
        intermediate_size=inter,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        max_positions=max_positions(cfg),
        dtype=str(dtype or "float32"),
        tie_word_embeddings=tied,
        gated_mlp=gated,
        layer_linears=shapes,
        n_experts=n_experts,
        experts_per_token=experts_per_token,
    )


def _visible_indices(spec: str | None, uuids: list[str]) -> list[int]:
    """The NVML indices CUDA_VISIBLE_DEVICES lets the engine see (NVML itself ignores the variable)."""
    everything = list(range(len(uuids)))
    if spec is None:
        return everything
    visible: list[int] = []
    for item in (part.strip() for part in spec.split(",")):
        if item.isdigit() and int(item) < len(uuids):
            visible.append(int(item))
        elif item.startswith("GPU-"):
            found = [i for i, uuid in enumerate(uuids) if uuid.startswith(item)]
            if not found:
                break
            visible.append(found[0])
        else:
            # CUDA stops at the first entry it cannot resolve ("-1", "", a MIG id we do not map)
            break
    return visible


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_gpu_facts() -> list[GpuFacts]:
    """The GPUs this process could train on, with their free memory now; empty when NVML is missing or fails."""
    try:
        import pynvml  # nvidia-ml-py; imported here so hosts without an NVIDIA driver never load it
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(handle)) for handle in handles]
        gpus: list[GpuFacts] = []
        for index in _visible_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids):
            handle = handles[index]
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuFacts(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    compute_capability=(int(major), int(minor)),
                )
            )
        return gpus
    except (pynvml.NVMLError, OSError):
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError, OSError):
            pynvml.nvmlShutdown()


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def read_host_facts(meminfo: Path = Path("/proc/meminfo"), cpuinfo: Path = Path("/proc/cpuinfo")) -> HostFacts:
    """Available system memory (Linux MemAvailable, else free physical pages) and native bf16; unknown elsewhere."""
    return HostFacts(cpu_memory_bytes=_available_memory(meminfo), cpu_bf16=_cpu_has_bf16(cpuinfo))


def _available_memory(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cpu_has_bf16(cpuinfo: Path) -> bool:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return not CPU_BF16_FLAGS.isdisjoint(line.partition(":")[2].split())
    except OSError:
        pass
    return False
