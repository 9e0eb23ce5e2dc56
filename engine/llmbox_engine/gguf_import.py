"""Importing a GGUF file into a normal Hugging Face folder (safetensors + tokenizer).

transformers dequantizes GGUF weights to dense tensors on load, but refuses `save_pretrained` on the
result ("quantized with gguf and is not serializable"). The weights are dense already, so the model is
rebuilt from its config (without the quantization marker) and the state dict assigned into it.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmbox.errors import UserError
from llmbox_engine.atomic import staged_dir
from llmbox_engine.export.hf_folder import save_tokenizer


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write `out_dir` as an HF folder loadable by `AutoModelForCausalLM.from_pretrained`.

    The folder appears atomically: it is written beside `out_dir` and renamed into place.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.expanduser().resolve()
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    with gguf_path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_path}: not a GGUF file (bad magic bytes)")
    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    _check_no_meta(model, gguf_path)
    del loaded

    out_dir = out_dir.expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging)
        source = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "dtype": dtype}
        (staging / "llmbox_import.json").write_text(json.dumps(source, indent=2))
    return out_dir


def _check_no_meta(model: object, source: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]  # type: ignore[attr-defined]
    if missing:
        raise UserError(f"{source}: the GGUF file lacks weights for {', '.join(missing[:5])}")
