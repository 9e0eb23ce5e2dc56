"""The base model with a trained adapter folded into its weights, as peft merges it.

The base is always loaded unquantized: a QLoRA adapter is merged into the full-precision weights, never
into 4-bit ones (rounding those again would lose what quantization already lost, twice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmbox.errors import UserError
from llmbox.model_facts import read_config
from llmbox_engine.serve.adapters import AdapterFiles, linear_shapes, read_adapter
from llmbox_engine.serve.watch import AdapterError
from llmbox_engine.train.artifacts import model_fingerprint
from llmbox_handlers import match_handler

log = logging.getLogger("llmbox.export")


@dataclass
class Merged:
    model: Any  # a plain transformers model (no peft wrapper left)
    tokenizer: Any
    chat_template: str | None  # the tokenizer's, else the family handler's
    config: dict[str, Any]  # config.json as stored
    base_path: Path
    base_fingerprint: str
    adapter: AdapterFiles | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know about this export


def stored_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype the base's weights are stored in (config.json says; bfloat16 when it does not)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def load_merged(
    model_path: Path, adapter_dir: Path | None, dtype: torch.dtype, trust_remote_code: bool = False
) -> Merged:
    """The base at `model_path` in `dtype`, with the adapter in `adapter_dir` merged (None: the base alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_config(model_path)
    handler = match_handler(config).handler
    if handler.takes_images(config):
        raise UserError(f"{model_path}: exporting a vision model ({config.get('model_type')}) is not supported yet")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    merged = Merged(
        model=model,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template or handler.chat_template,
        config=config,
        base_path=model_path,
        base_fingerprint=model_fingerprint(model_path),
    )
    if adapter_dir is not None:
        merged.adapter = _merge_adapter(merged, adapter_dir)
    return merged


def read_checked_adapter(adapter_dir: Path, model: Any, base_fingerprint: str, notes: list[str]) -> AdapterFiles:
    """The adapter, checked against `model`'s layers (a weightless meta model will do); a note when it was
    trained on other base weights."""
    try:
        files = read_adapter(adapter_dir, linear_shapes(model), base_fingerprint)
    except AdapterError as exc:
        raise UserError(str(exc)) from None
    if not files.base_matches:
        notes.append(f"{adapter_dir} was trained on other base weights (fingerprint differs); exported anyway")
    return files


def _merge_adapter(merged: Merged, adapter_dir: Path) -> AdapterFiles:
    from peft import get_peft_model, set_peft_model_state_dict

    files = read_checked_adapter(adapter_dir, merged.model, merged.base_fingerprint, merged.notes)
    plan = files.info.get("plan") or {}
    if plan.get("load_in_4bit") or plan.get("load_in_8bit"):
        merged.notes.append("the adapter was trained on quantized weights; merged into the full-precision base")
    peft_model = get_peft_model(merged.model, files.config)
    result: Any = set_peft_model_state_dict(peft_model, files.state_dict)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"{files.path}: weights this model has no place for: {', '.join(unexpected[:5])}")
    with torch.no_grad():
        merged.model = peft_model.merge_and_unload()
    return files
