"""Loading the base model as the plan says (precision, 4/8-bit, attention, checkpointing) and wrapping it in LoRA."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from llmbox_engine import quantized

# the weights' dtype per plan precision; bf16-mixed keeps fp32 weights and multiplies in bf16 (autocast)
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "bf16-mixed": "float32"}


def attention_implementation(device: str, handler_supports_flash: bool, vision: bool = False) -> str:
    """flash-attention 2 on a GPU where it is installed and the family supports it (varlen packing); on CPU,
    for the same families' text models, SDPA run per packed example (`packed_attention`); else PyTorch SDPA."""
    if handler_supports_flash and device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if handler_supports_flash and device == "cpu" and not vision:
        from llmbox_engine.train.packed_attention import register

        return register()
    return "sdpa"


def takes_packed_rows(attention: str) -> bool:
    """Whether this attention keeps packed examples apart by their position ids, at no extra cost."""
    from llmbox_engine.train.packed_attention import PACKED_SDPA

    return attention in ("flash_attention_2", PACKED_SDPA)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # padding is masked out of attention and loss, so any id will do; EOS is always there
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_dir: Path,
    *,
    precision: str,
    method: str,
    use_8bit: bool,
    attention: str,
    device: str,
    trust_remote_code: bool = False,
    vision: bool = False,
    sharded: bool = False,
) -> Any:
    """The base model; `vision`: an image-text-to-text model (Gemma 3, LLaVA) with its vision tower;
    `sharded`: to be split by FSDP2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    dtype = getattr(torch, TORCH_DTYPES[precision])
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention, "trust_remote_code": trust_remote_code}
    if method == "qlora" or use_8bit:
        quantized.require("QLoRA (4-bit weights)" if method == "qlora" else "--use-8bit", device)
        compute = torch.bfloat16 if precision == "bf16-mixed" else dtype  # bf16-mixed multiplies in bf16
        # FSDP2 shards the packed 4-bit storage as tensors of this dtype; uint8 there trains to NaN
        storage = compute if sharded and method == "qlora" else None
        kwargs["quantization_config"] = quantized.config(4 if method == "qlora" else 8, compute, storage)
        kwargs["device_map"] = {"": device}
    auto_class: Any = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model: Any = auto_class.from_pretrained(str(model_dir), **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device)
    else:
        quantized.keep_one_weight_format(model)
    model.config.use_cache = False  # training: a KV cache is wasted memory, and it disables packed-sequence masks
    return model


def wrap_lora(
    model: Any,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: tuple[str, ...] | str | None,
    gradient_checkpointing: bool,
    quantized: bool,
) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # the form DDP supports
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # None: every linear layer but the output head, peft's own rule for it
        # a string: a regex over whole module paths (vision models: the language model's layers only)
        target_modules=(target_modules if isinstance(target_modules, str) else list(target_modules))
        if target_modules
        else "all-linear",
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


def frozen_linears_to_bf16(model: Any) -> int:
    """Store every frozen linear weight in bf16, for a model that runs under bf16 autocast (bf16-mixed).

    Autocast multiplies in bf16 by casting each fp32 weight at every matmul, again on every pass, because it
    caches casts of trainable leaves only. Casting the frozen weights once gives the same products (the same
    rounding) without that copy, and halves their memory. Trainable LoRA weights, norms and the embedding stay
    fp32; an output head tied to the embedding gets its own bf16 copy, so the embedding is untouched.
    Returns how many weights were cast.
    """
    import torch
    from torch import nn

    cast = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.requires_grad or module.weight.dtype != torch.float32:
            continue  # LoRA's own layers train; quantized and 16-bit layers are not plain fp32 Linear
        module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
        cast += 1
    return cast
