"""Reading a trained adapter folder and refusing broken ones, off the model (`watch` notices new ones)."""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmbox_engine.host_view import host_path
from llmbox_engine.serve.watch import (
    CONFIG_FILE,
    WEIGHT_FILES,
    AdapterError,
    Signature,
    read_bytes,
    read_info,
    read_json,
    signature,
)

log = logging.getLogger("llmbox.serve")

# a LoRA pair's weight in a peft state dict: the module it sits on, and A or B
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterFiles:
    path: Path
    config: Any  # peft's LoraConfig
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]  # adapter_info.json ({} for adapters not trained by llmbox)
    fingerprint: str  # of the weights' bytes
    signature: Signature | None
    base_matches: bool = True  # False: adapter_info.json names other base weights
    weights_file: str = field(default=WEIGHT_FILES[0])

    @property
    def created_at(self) -> str | None:
        value = self.info.get("created_at")
        return str(value) if value is not None else None

    @property
    def final_loss(self) -> tuple[str, float] | None:
        for key, label in (("final_val_loss", "validation"), ("final_train_loss", "training")):
            value = self.info.get(key)
            if isinstance(value, int | float):
                return label, float(value)
        return None

    def describe(self) -> str:
        loss = self.final_loss
        facts = [
            f"trained {self.created_at or 'at an unknown date'}",
            f"final {loss[0]} loss {loss[1]:.4f}" if loss else "final loss unknown",
            f"fingerprint {self.fingerprint[:12]}",
        ]
        return f"{host_path(self.path)} ({', '.join(facts)})"


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) of every layer LoRA can sit on (GPT-2's Conv1D included)."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # weight stored [in, out]
            shapes[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
    return shapes


def read_adapter(folder: Path, linear_shapes: dict[str, tuple[int, int]], base_fingerprint: str) -> AdapterFiles:
    """Read and check an adapter folder against the base model's layers; AdapterError says what is wrong."""
    seen = signature(folder)
    if seen is None or not folder.is_dir():
        raise AdapterError(f"{folder}: no such folder")
    config = _read_config(folder)
    info = read_info(folder)
    weights_file = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights_file is None:
        raise AdapterError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")
    data = read_bytes(folder / weights_file)
    state_dict = _load_weights(data, folder / weights_file)
    check_shapes(state_dict, linear_shapes, folder / weights_file)
    recorded = info.get("base_model", {}).get("fingerprint") if isinstance(info.get("base_model"), dict) else None
    return AdapterFiles(
        path=folder,
        config=config,
        state_dict=state_dict,
        info=info,
        fingerprint=hashlib.blake2b(data, digest_size=16).hexdigest(),
        signature=seen,
        base_matches=recorded in (None, base_fingerprint),
        weights_file=weights_file,
    )


def _read_config(folder: Path) -> Any:
    from peft import LoraConfig

    path = folder / CONFIG_FILE
    raw = read_json(path)
    if raw.get("peft_type") not in (None, "LORA"):
        raise AdapterError(f"{path}: a {raw.get('peft_type')} adapter; only LoRA adapters are served")
    try:
        return LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft's own checks of the values
        raise AdapterError(f"{path}: not a valid LoRA config: {exc}") from None


def _load_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state_dict = load(data)
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt files fail in many ways
        raise AdapterError(f"{path}: corrupt weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterError(f"{path}: not a state dict of tensors")
    return state_dict


def check_shapes(state_dict: dict[str, torch.Tensor], linear_shapes: dict[str, tuple[int, int]], path: Path) -> None:
    """Every LoRA pair must sit on a linear layer of this model, with A [r, in] and B [out, r]."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue
        module, which = match["module"], match["which"]
        if module not in linear_shapes:
            raise AdapterError(f"{path}: {key}: this model has no linear layer {module!r} (another model's adapter?)")
        inputs, outputs = linear_shapes[module]
        shape = tuple(tensor.shape)
        fits = len(shape) == 2 and (shape[1] == inputs if which == "A" else shape[0] == outputs)
        if not fits:
            expected = f"[r, {inputs}]" if which == "A" else f"[{outputs}, r]"
            raise AdapterError(f"{path}: {key} has shape {list(shape)}, expected {expected} (another model's adapter?)")
        pairs.setdefault(module, {})[which] = shape
    if not pairs:
        raise AdapterError(f"{path}: holds no LoRA weights")
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(pair)} without its pair")
        if pair["A"][0] != pair["B"][1]:
            raise AdapterError(f"{path}: {module}: the ranks of lora_A and lora_B differ")
