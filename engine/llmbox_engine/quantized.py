"""bitsandbytes for training and serving: 4-bit NF4 and 8-bit weights, on a CUDA GPU or on its CPU backend.

bitsandbytes 0.49+ runs on CPUs too, so every quantized path trains and serves here as it does on a GPU (slower:
a CPU dequantizes per matmul). `require` checks it before a model loads, so a missing or unusable build is one
clear error instead of a crash deep inside `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any, Literal

from llmbox.errors import UserError

Bits = Literal[4, 8]

# Messages bitsandbytes logs that say nothing to our users: the optional faster CPU 4-bit kernel comes from the
# model hub (`kernels`), and 8-bit matmuls always quantize their inputs through fp16 (logged at every call).
QUIET_MESSAGES = ("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_MESSAGES)


def quiet_noise() -> None:
    """Filter the messages above; in effect for a module imported later too (peft imports bitsandbytes)."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())
    # the plan already says a CPU runs paged_adamw_8bit unpaged
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


quiet_noise()  # an in-process user of the engine (tests, benchmarks) imports this module before peft


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported once this module's filters are in place."""
    import bitsandbytes

    return bitsandbytes


def require(what: str, device: str) -> None:
    """bitsandbytes must import and quantize on `device` ("cpu", "cuda", "cuda:1"); a UserError naming the
    missing piece otherwise."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{what} needs bitsandbytes, which is not installed here: pip install 'bitsandbytes>=0.49' "
            "(the engine images have it), or train with --method lora and --optimizer adamw_torch"
        )
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} was planned for a CUDA GPU, but none is visible to this process")
    try:
        bnb = import_bitsandbytes()
        probe = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
        bnb.functional.quantize_4bit(probe, quant_type="nf4")
    except Exception as exc:  # an old build without this device's backend fails in many ways
        version = getattr(importlib.import_module("bitsandbytes"), "__version__", "?")
        raise UserError(
            f"{what} needs bitsandbytes with {device.split(':')[0].upper()} support; bitsandbytes {version} "
            f"failed to quantize there ({type(exc).__name__}: {exc}): pip install -U 'bitsandbytes>=0.49'"
        ) from exc


def config(bits: Bits, compute: Any, storage: Any = None) -> Any:
    """The `BitsAndBytesConfig` for 4-bit NF4 with double quantization (the QLoRA recipe) or 8-bit weights.
    `storage`: the dtype FSDP2 shards 4-bit weights as (the compute dtype; uint8 there trains to NaN)."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": storage} if storage is not None else {}),
    )


def keep_one_weight_format(model: Any) -> None:
    """Keep 4-bit layers in the format they train in, through evaluations too. On CPUs with AVX512-BF16,
    bitsandbytes repacks a layer's weights for a faster inference kernel the first time it runs without
    gradients, and every later pass, training ones included, then computes from the repacked weights with
    slightly different rounding: a run's steps would change numerics at its first evaluation, and a resumed
    run (which evaluates at other steps) would not continue the curve exactly."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
