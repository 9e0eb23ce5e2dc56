"""`llmbox export`: what was asked, the merge, the file(s), and what to run next."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import torch

from llmbox.export_request import ExportRequest
from llmbox.model_facts import read_config
from llmbox_engine.atomic import staged_file
from llmbox_engine.export import ollama
from llmbox_engine.export.merge import Merged, load_merged, read_checked_adapter, stored_dtype
from llmbox_engine.host_view import host_path, model_name
from llmbox_engine.train.artifacts import model_fingerprint

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def run_export(model_path: Path, adapter_dir: Path | None, request: ExportRequest, trust_remote_code: bool) -> None:
    started = time.monotonic()
    name = model_name(model_path)
    if request.format == "lora-gguf":
        assert adapter_dir is not None  # the request refuses lora-gguf without an adapter
        from llmbox_engine.export.gguf_file import write_lora_gguf

        config = read_config(model_path)
        notes: list[str] = []
        files = read_checked_adapter(
            adapter_dir, _skeleton(model_path, trust_remote_code), model_fingerprint(model_path), notes
        )
        write_lora_gguf(files, config, request.output, request.quant, f"{name}-lora")
    else:
        dtype = _load_dtype(request, read_config(model_path))
        merged = load_merged(model_path, adapter_dir, dtype, trust_remote_code)
        notes = list(merged.notes)
        if request.format == "hf":
            from llmbox_engine.export.hf_folder import write_hf_folder

            write_hf_folder(merged, request.output, dtype, _provenance(merged, request))
        else:
            from llmbox_engine.export.gguf_file import write_model_gguf

            notes += write_model_gguf(merged, request.output, request.quant, name)
        if request.modelfile is not None:
            _write_modelfile(merged, request)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"exported {host_path(request.output)} ({_size(request.output)}, {time.monotonic() - started:.0f} s)")
    if request.modelfile is not None:
        tag = ollama.ollama_name(request.output)
        click.echo(f"ollama: ollama create {tag} -f {host_path(request.modelfile)} && ollama run {tag}")


def _load_dtype(request: ExportRequest, config: dict[str, Any]) -> torch.dtype:
    """hf: as asked (auto: as stored). GGUF: as stored, fp32 when asked for f32 (the writer rounds once, itself)."""
    if request.format == "hf":
        return TORCH_DTYPES[request.dtype] if request.dtype != "auto" else stored_dtype(config)
    return torch.float32 if request.quant == "f32" else stored_dtype(config)


def _skeleton(model_path: Path, trust_remote_code: bool) -> Any:
    """The base model without weights (meta tensors): its layer shapes, to check an adapter against."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)


def _provenance(merged: Merged, request: ExportRequest) -> dict[str, Any]:
    adapter = merged.adapter
    return {
        "format": request.format,
        "dtype": request.dtype,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"path": host_path(merged.base_path), "fingerprint": merged.base_fingerprint},
        "adapter": None
        if adapter is None
        else {
            "path": host_path(adapter.path),
            "fingerprint": adapter.fingerprint,
            "created_at": adapter.created_at,
            "final_loss": adapter.final_loss,
        },
        "notes": merged.notes,
    }


def _write_modelfile(merged: Merged, request: ExportRequest) -> None:
    assert request.modelfile is not None
    text = ollama.modelfile(
        request.output.name,
        merged.chat_template,
        merged.tokenizer.eos_token,
        merged.config.get("max_position_embeddings"),
    )
    with staged_file(request.modelfile) as staging:
        staging.write_text(text)


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 2**20:.1f} MiB" if total < 2**30 else f"{total / 2**30:.2f} GiB"
