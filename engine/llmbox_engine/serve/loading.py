"""Loading the base model and its tokenizers for serving."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmbox.model_facts import max_positions, read_config
from llmbox_engine import quantized
from llmbox_engine.host_view import model_name
from llmbox_engine.serve.adapters import linear_shapes
from llmbox_engine.serve.prompts import stop_token_ids
from llmbox_engine.serve.watch import AdapterError, read_info
from llmbox_engine.train.artifacts import model_fingerprint
from llmbox_engine.train.model_setup import load_tokenizer
from llmbox_handlers import match_handler

DTYPES = ("auto", "float32", "bfloat16", "float16")
# a tokenizer's model_max_length above this is a placeholder ("no limit"), not the model's context
MAX_CREDIBLE_CONTEXT = 1 << 22
DEFAULT_CONTEXT = 2048


@dataclass
class LoadedModel:
    model: Any  # the base model; peft wraps it in place once an adapter loads
    tokenizer: Any  # the generation worker's, for decoding
    prompt_tokenizer: Any  # the HTTP side's, for encoding (a fast tokenizer is not thread-safe)
    fallback_template: str  # the handler's chat template, for tokenizers that ship none
    stop_ids: frozenset[int]
    context_length: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    name: str
    path: Path
    model_type: str
    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features), to check adapters
    cache_argument: str = "cache"  # the forward argument (and output field) of the KV cache
    keeps_logits: bool = True  # forward takes `logits_to_keep` (a prompt's logits are then one row, not one per token)
    processor: Any = None  # multimodal models: the HTTP side's AutoProcessor, for requests with images


def forward_parameters(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # half precision on CPU is slow and less exact


def base_weights_for(asked: str, adapter_dir: Path | None) -> tuple[str, str]:
    """("full" | "4bit" | "8bit", why). `auto` holds the base as the adapter in `adapter_dir` was trained: a QLoRA
    adapter learned against 4-bit weights, rounding errors included, and answers best on them (measured on
    SmolLM2 after training to a loss of 0.01: 12/12 trained facts on the 4-bit base, 10/12 on the fp32 one)."""
    if asked != "auto":
        return asked, "--base-weights"
    plan: dict[str, Any] = {}
    if adapter_dir is not None:
        with contextlib.suppress(AdapterError):  # the adapter's own loading reports a broken file
            plan = read_info(adapter_dir).get("plan") or {}
    if plan.get("load_in_4bit"):
        return "4bit", "the adapter was trained on 4-bit weights; --base-weights full for full precision"
    if plan.get("load_in_8bit"):
        return "8bit", "the adapter was trained on 8-bit weights; --base-weights full for full precision"
    return "full", "full precision"


def load_model(
    model_path: Path, dtype_name: str = "auto", trust_remote_code: bool = False, base_weights: str = "full"
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = read_config(model_path)
    handler = match_handler(config).handler
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = pick_dtype(dtype_name, device)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    vision = handler.takes_images(config)
    auto_class: Any = AutoModelForCausalLM
    if vision:
        from transformers import AutoModelForImageTextToText

        auto_class = AutoModelForImageTextToText
    extra: dict[str, Any] = {}
    if base_weights in ("4bit", "8bit"):
        quantized.require(f"--base-weights {base_weights}", device.type)
        extra["quantization_config"] = quantized.config(4 if base_weights == "4bit" else 8, compute=dtype)
        extra["device_map"] = {"": str(device)}
    model: Any = auto_class.from_pretrained(str(model_path), dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if not extra:
        model.to(device)
    model.eval()
    model.config.use_cache = True
    context = max_positions(config)
    if context is None:
        limit = getattr(tokenizer, "model_max_length", None)
        context = limit if isinstance(limit, int) and 0 < limit < MAX_CREDIBLE_CONTEXT else DEFAULT_CONTEXT
    generation_config = getattr(model, "generation_config", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        prompt_tokenizer=load_tokenizer(model_path, trust_remote_code),
        fallback_template=handler.chat_template,
        stop_ids=stop_token_ids(tokenizer, getattr(generation_config, "eos_token_id", None)),
        context_length=context,
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        device=device,
        dtype=dtype,
        name=model_name(model_path),
        path=model_path,
        model_type=str(config.get("model_type", "")),
        fingerprint=model_fingerprint(model_path),
        linear_shapes=linear_shapes(model),
        # transformers 5 renamed `past_key_values` to `cache`: take whichever this version's forward has
        cache_argument="cache" if "cache" in forward_parameters(model) else "past_key_values",
        keeps_logits="logits_to_keep" in forward_parameters(model),
        processor=_processor(model_path, trust_remote_code) if vision else None,
    )


def _processor(model_path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
