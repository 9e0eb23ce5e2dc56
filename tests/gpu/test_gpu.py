"""The GPU test set (`make test-gpu`): QLoRA 4-bit, bf16, 8-bit optimizers and NVML planning on a real GPU.

Not part of `make test` (the CPU suite); on a machine without a CUDA GPU these fail, they never skip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmbox.facts import read_gpu_facts

from train_helpers import adapter_info, qa_file, train


@pytest.fixture(autouse=True, scope="module")
def require_cuda() -> None:
    assert torch.cuda.is_available(), "make test-gpu needs a CUDA GPU and a CUDA build of torch"


def test_nvml_sees_the_gpu_torch_sees() -> None:
    gpus = read_gpu_facts()
    assert len(gpus) == torch.cuda.device_count() > 0
    assert gpus[0].total_bytes > 4 * 1024**3 and 0 < gpus[0].free_bytes <= gpus[0].total_bytes
    assert gpus[0].compute_capability == torch.cuda.get_device_capability(0)


def test_lora_in_bf16_where_the_gpu_supports_it(tmp_path: Path, tiny_model_factory: Callable[..., Path]) -> None:
    result = train(tiny_model_factory("gemma3"), tmp_path, qa_file(tmp_path), max_steps=4)
    plan = adapter_info(tmp_path)["plan"]
    assert plan["device"] == "cuda" and plan["method"] == "lora"
    assert plan["precision"] == ("bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16")
    assert result.best_val is not None and math.isfinite(result.best_val)


def test_qlora_4bit_trains_and_saves_a_standard_adapter(tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(tiny_llama, tmp_path, qa_file(tmp_path), method="qlora", max_steps=4, learning_rate=1e-2)
    plan = adapter_info(tmp_path)["plan"]
    assert plan["load_in_4bit"] and plan["gradient_checkpointing"] and plan["optimizer"] == "paged_adamw_8bit"
    assert result.best_val is not None and math.isfinite(result.best_val)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "lora")


@pytest.mark.parametrize("optimizer", ["adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"])
def test_other_optimizers(tmp_path: Path, tiny_llama: Path, optimizer: str) -> None:
    result = train(tiny_llama, tmp_path, qa_file(tmp_path), optimizer=optimizer, max_steps=3)
    assert adapter_info(tmp_path)["plan"]["optimizer"] == optimizer
    assert result.steps == 3


def test_8bit_base_weights(tmp_path: Path, tiny_llama: Path) -> None:
    train(tiny_llama, tmp_path, qa_file(tmp_path), use_8bit=True, max_steps=3)
    assert adapter_info(tmp_path)["plan"]["load_in_8bit"]
