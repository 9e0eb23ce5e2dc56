"""The merged model as a Hugging Face folder: safetensors, tokenizer, chat template, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llmbox_engine.atomic import staged_dir
from llmbox_engine.export.merge import Merged
from llmbox_engine.train.artifacts import ADAPTER_INFO

EXPORT_INFO = "llmbox_export.json"


def write_hf_folder(merged: Merged, out_dir: Path, dtype: torch.dtype, provenance: dict[str, Any]) -> Path:
    """Write `out_dir` beside its final name and rename it into place (a reader never sees half of it)."""
    model = merged.model.to(dtype)
    model.config.dtype = dtype
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = merged.tokenizer
        if not tokenizer.chat_template and merged.chat_template:
            tokenizer.chat_template = merged.chat_template  # the family's template, so any runtime can chat
        save_tokenizer(tokenizer, staging)
        if merged.adapter is not None and (merged.adapter.path / ADAPTER_INFO).is_file():
            shutil.copy2(merged.adapter.path / ADAPTER_INFO, staging / ADAPTER_INFO)
        (staging / EXPORT_INFO).write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save it so that transformers 4.x loads it too: 5.x names `TokenizersBackend` as its class, which 4.x
    (and the tools pinned to it) cannot load; the fast class reads in both."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
