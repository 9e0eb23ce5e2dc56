"""What each model family looks like in GGUF: its architecture name, its hyperparameter keys and the tensor
transforms llama.cpp expects (the same ones llama.cpp's own converter applies).

- llama and mistral are both GGUF `llama`; their q/k rows are permuted from HF's rotate-half rope layout to
  the interleaved one llama.cpp computes (for a LoRA pair, B's rows: A acts on the input side).
- gemma3 stores its RMSNorm weights as w where the layer computes x * (1 + w); GGUF stores 1 + w.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmbox.errors import UserError

GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's gemma3: five sliding-window layers, then one global


@dataclass(frozen=True)
class GgufArch:
    name: str  # general.architecture
    permutes_qk: bool = False
    norms_plus_one: bool = False
    # writes the family's extra hyperparameter keys; (writer, config) -> None
    extra_keys: Callable[[Any, dict[str, Any]], None] | None = None


def _llama_keys(writer: Any, config: dict[str, Any]) -> None:
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def _gemma3_keys(writer: Any, config: dict[str, Any]) -> None:
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    local = rope_theta(config, "sliding_attention") or config.get("rope_local_base_freq")
    if local:
        writer.add_rope_freq_base_swa(float(local))


ARCHES: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permutes_qk=True, extra_keys=_llama_keys),
    "mistral": GgufArch("llama", permutes_qk=True, extra_keys=_llama_keys),  # GGUF has no separate mistral
    "qwen2": GgufArch("qwen2"),
    "gemma3_text": GgufArch("gemma3", norms_plus_one=True, extra_keys=_gemma3_keys),
}


def arch_for(config: dict[str, Any], source: str) -> GgufArch:
    model_type = str(config.get("model_type", ""))
    arch = ARCHES.get(model_type)
    if arch is None:
        families = ", ".join(sorted(ARCHES))
        raise UserError(f"{source}: GGUF export of the {model_type or 'unknown'} family is not supported yet "
                        f"(supported: {families}); --format hf works for every family")  # fmt: skip
    if model_type == "gemma3_text":
        _check_gemma3_matches_llama_cpp(config, source)
    return arch


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_theta(config: dict[str, Any], layer_kind: str = "full_attention") -> float | None:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer kind for gemma3); 4.x in `rope_theta`."""
    params = config.get("rope_parameters") or {}
    if isinstance(params.get(layer_kind), dict):
        params = params[layer_kind]
    elif layer_kind != "full_attention":
        return None
    value = params.get("rope_theta", config.get("rope_theta"))
    return float(value) if value is not None else None


def rope_scaling(config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    kind = params.get("rope_type") or params.get("type") or "default"
    return {**params, "rope_type": kind}


def add_hyperparameters(writer: Any, arch: GgufArch, config: dict[str, Any], source: str) -> np.ndarray | None:
    """Write the model's hyperparameter keys; returns llama3-style per-frequency rope factors to store as
    `rope_freqs.weight`, if the model has them."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    theta = rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if arch.extra_keys:
        arch.extra_keys(writer, config)
    scaling = rope_scaling(config)
    kind = scaling["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "llama3" and arch.name == "llama":
        return llama3_rope_factors(scaling, theta or 10000.0, head_dim(config))
    raise UserError(f"{source}: rope scaling {kind!r} is not supported by the GGUF export yet")


def llama3_rope_factors(scaling: dict[str, Any], theta: float, dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, as the factors llama.cpp divides each frequency by."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def transform(arch: GgufArch, hf_name: str, data: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """A base weight in llama.cpp's layout (`hf_name` ends in .weight or .bias)."""
    if arch.permutes_qk:
        heads = config["num_attention_heads"]
        if ".q_proj." in hf_name:
            return permute_rows(data, heads)
        if ".k_proj." in hf_name:
            return permute_rows(data, config.get("num_key_value_heads") or heads)
    if arch.norms_plus_one and hf_name.endswith("norm.weight"):
        return data + 1.0
    return data


def transform_lora_b(arch: GgufArch, hf_name: str, data: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """B holds the output rows of a LoRA pair, so the q/k row permutation lands on it alone."""
    return transform(arch, hf_name, data, config) if ".q_proj." in hf_name or ".k_proj." in hf_name else data


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows from [first halves | second halves] (rotate-half) to interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _check_gemma3_matches_llama_cpp(config: dict[str, Any], source: str) -> None:
    """llama.cpp's gemma3 fixes the attention scale at 1/sqrt(head_dim) and the sliding pattern at 5:1."""
    dim = head_dim(config)
    scalar = config.get("query_pre_attn_scalar", dim)
    if scalar not in (dim, config["hidden_size"] // config["num_attention_heads"]):
        raise UserError(f"{source}: query_pre_attn_scalar {scalar} differs from head_dim {dim}; llama.cpp's gemma3 "
                        "scales attention by head_dim, so the GGUF would answer differently")  # fmt: skip
    layers = config.get("layer_types")
    pattern = [
        "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
        for i in range(config["num_hidden_layers"])
    ]
    if layers and list(layers) != pattern:
        raise UserError(f"{source}: its sliding-window layers are not gemma3's five-then-one pattern, which "
                        "llama.cpp assumes; the GGUF would answer differently")  # fmt: skip
