"""Exporting tiny models with random adapters, and what base + adapter computes through peft, to compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny_models import build_tiny_model

GGUF_FAMILIES = ("llama", "mistral", "qwen2", "gemma3")
PROMPT = "What is the capital of France? Paris is"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# transformers' GGUF reader takes gemma3's attention scale from head_dim 256 (the real models' value)
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {"gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256}}


def build_adapted_model(family: str, root: Path) -> tuple[Path, Path]:
    """(model folder, adapter folder): a tiny model and a random adapter on every projection, with a larger
    alpha on v_proj (a per-module scale the LoRA GGUF must carry)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(family, root / "model", **MODEL_OVERRIDES.get(family, {}))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = {"gpt2": ["c_attn", "c_proj", "c_fc"], "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=targets.get(family, PROJECTIONS), alpha_pattern={"v_proj": 32}
    )
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # peft starts B at zero: make the adapter change the model
    model.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


def reference(model_dir: Path, adapter_dir: Path | None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter_dir) if adapter_dir else model).eval()


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"])


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy(model: Any, ids: list[int], n: int = 8) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def export(model_dir: Path, adapter_dir: Path | None, out: Path, *flags: str) -> None:
    from llmbox.export_request import export_request
    from llmbox_engine.export.command import run_export

    values = {"format": "hf", "output": str(out), "dtype": "auto", "quant": "f16", "no_lora": adapter_dir is None,
              "ollama": False, "force": False}  # fmt: skip
    args = iter(flags)
    for flag in args:
        values[flag.lstrip("-").replace("-", "_")] = True if flag in ("--ollama", "--force") else next(args)
    run_export(model_dir, adapter_dir, export_request(values), trust_remote_code=False)
