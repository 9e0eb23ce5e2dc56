"""Writing GGUF files with the gguf package's writer: the merged model, or the adapter alone as a GGUF LoRA.

Types follow llama.cpp's converter: norms, biases and other 1-D tensors stay F32; a tensor whose rows do not
split into the type's blocks falls back to F16; with a 4- or 5-bit type the embedding and output matrices
keep 8 bits (they dominate what low-bit quantization loses on small models).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from llmbox.errors import UserError
from llmbox_engine.atomic import staged_file
from llmbox_engine.export.gguf_arch import (
    GgufArch,
    add_hyperparameters,
    arch_for,
    transform,
    transform_lora_b,
)
from llmbox_engine.export.gguf_vocab import add_vocab
from llmbox_engine.export.merge import Merged
from llmbox_engine.serve.adapters import LORA_KEY, AdapterFiles

F16_MAX = 65504.0
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")
T = TypeVar("T")


def write_model_gguf(merged: Merged, path: Path, quant: str, name: str) -> list[str]:
    """The merged model as one GGUF file at `path`; returns notes for the user."""
    import gguf

    source = str(merged.base_path)
    config = merged.config
    arch = arch_for(config, source)
    state = merged.model.state_dict()
    vocab_size = int(merged.model.get_input_embeddings().weight.shape[0])
    tied = bool(getattr(merged.model.config, "tie_word_embeddings", False))
    names = _name_map(arch, config["num_hidden_layers"])
    with staged_file(path) as staging:
        writer = gguf.GGUFWriter(staging, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_safe_name(name))
        rope_factors = add_hyperparameters(writer, arch, {**config, "vocab_size": vocab_size}, source)
        writer.add_file_type(_file_type(quant))
        notes = add_vocab(writer, merged.tokenizer, merged.base_path, vocab_size, merged.chat_template)
        if rope_factors is not None:
            writer.add_tensor("rope_freqs.weight", rope_factors)
        for hf_name, tensor in _progress(list(state.items()), f"writing {path.name}"):
            if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a tied head is the embedding: llama.cpp reuses token_embd
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"{source}: no GGUF name for the tensor {hf_name} ({arch.name} architecture)")
            data = transform(arch, hf_name, tensor.to(torch.float32).numpy(), config)
            _add_tensor(writer, gguf_name, data, quant)
        _finish(writer)
    return notes


def write_lora_gguf(files: AdapterFiles, config: dict[str, Any], path: Path, quant: str, name: str) -> None:
    """The adapter alone, as llama.cpp and Ollama (`ADAPTER`) apply it over the base model's GGUF."""
    import gguf

    source = str(files.path)
    arch = arch_for(config, source)
    pairs = lora_pairs(files, bool(config.get("tie_word_embeddings")))
    scales = {module: lora_scale(files.config, module, a.shape[0]) for module, (a, _) in pairs.items()}
    # llama.cpp scales each pair by alpha / r (r from the tensor): one alpha serves when alpha / r is every
    # pair's scale; otherwise (per-module alphas, rsLoRA across ranks) each B carries its own scale and alpha is 0
    alphas = {round(scale * pairs[m][0].shape[0], 6) for m, scale in scales.items()}
    alpha = alphas.pop() if len(alphas) == 1 else 0.0
    names = _name_map(arch, config["num_hidden_layers"])
    with staged_file(path) as staging:
        writer = gguf.GGUFWriter(staging, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(_safe_name(name))
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for module, (a, b) in _progress(list(pairs.items()), f"writing {path.name}"):
            hf_name = f"{module}.weight"
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise UserError(f"{source}: llama.cpp has no tensor for {module} ({arch.name} architecture)")
            b_data = b.to(torch.float32).numpy() * (1.0 if alpha else scales[module])
            _add_tensor(writer, f"{gguf_name}.lora_a", a.to(torch.float32).numpy(), quant)
            _add_tensor(writer, f"{gguf_name}.lora_b", transform_lora_b(arch, hf_name, b_data, config), quant)
        _finish(writer)


def lora_pairs(files: AdapterFiles, tied: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B); anything else in the adapter (trained embeddings or heads, DoRA magnitudes) has no
    place in a GGUF LoRA, which holds low-rank pairs on linear layers only."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in files.state_dict.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise UserError(f"{files.path}: {key} is not a LoRA pair on a linear layer; a GGUF LoRA cannot hold it "
                            "(export --format gguf merges it into the model instead)")  # fmt: skip
        found.setdefault(match["module"], {})[match["which"]] = tensor
    if tied and "lm_head" in found:
        raise UserError(f"{files.path}: trains lm_head, which this model ties to its embedding; llama.cpp has no "
                        "separate output weight for it (export --format gguf merges it instead)")  # fmt: skip
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def lora_scale(config: Any, module: str, rank: int) -> float:
    """peft's scaling of one module's pair: alpha / r (alpha / sqrt(r) with rsLoRA), per-module patterns included."""
    from peft.utils.other import get_pattern_key

    alpha_pattern: dict[str, float] = dict(getattr(config, "alpha_pattern", None) or {})
    key = get_pattern_key(list(alpha_pattern), module)
    alpha = float(alpha_pattern[key]) if key in alpha_pattern else float(config.lora_alpha)
    return alpha / (rank**0.5 if getattr(config, "use_rslora", False) else rank)


def _add_tensor(writer: Any, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    qtype = _tensor_type(name, data, quant)
    try:
        encoded = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows that do not split into the type's blocks (e.g. B of a rank-8 pair)
        qtype = (
            gguf.GGMLQuantizationType.F16 if np.abs(data).max(initial=0) <= F16_MAX else gguf.GGMLQuantizationType.F32
        )
        encoded = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, encoded, raw_dtype=qtype)


def _tensor_type(name: str, data: np.ndarray, quant: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if quant in LOW_BIT and name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    if quant == "f16" and np.abs(data).max(initial=0) > F16_MAX:
        return Q.F32  # would overflow to inf
    return Q[quant.upper()]


def _file_type(quant: str) -> Any:
    from gguf import LlamaFileType as F

    return F.ALL_F32 if quant == "f32" else F[f"MOSTLY_{quant.upper()}"]


def _name_map(arch: GgufArch, blocks: int) -> Any:
    import gguf

    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch.name]
    return gguf.get_tensor_name_map(model_arch, blocks)


def _safe_name(name: str) -> str:
    # transformers' GGUF reader takes a model named exactly "mistral" for an architecture it cannot load
    return f"{name}-model" if name == "mistral" else name


def _finish(writer: Any) -> None:
    import gguf

    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _progress(items: Iterable[T], description: str) -> Iterator[T]:
    from rich.progress import track

    from llmbox.console import make_console

    yield from track(items, description=description, console=make_console(), transient=True)
