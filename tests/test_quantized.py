"""bitsandbytes on CPU: every way the planner can load a base (full, 4-bit NF4, 8-bit) with every optimizer it can
pick trains a tiny model for real, checkpoints, resumes and publishes a standard peft adapter."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmbox.errors import UserError
from llmbox.planning.terms import OPTIMIZERS

from train_helpers import adapter_info, qa_file, resume, train

LOADINGS: dict[str, dict[str, Any]] = {"lora": {"method": "lora"}, "qlora": {"method": "qlora"},
                                       "8bit": {"use_8bit": True}}  # fmt: skip


def history(output: Path, loss: str = "train_loss") -> dict[int, float]:
    """A loss by step, as the run's evaluations logged it."""
    state = json.loads((output / "checkpoints" / "last" / "trainer_state.json").read_text())
    return {e["step"]: e[loss] for e in state["evaluations"]}


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("loading", "optimizer"), list(itertools.product(LOADINGS, OPTIMIZERS)))
def test_every_loading_and_optimizer_trains_and_publishes_a_standard_adapter(
    tmp_path: Path, tiny_llama: Path, loading: str, optimizer: str
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(tiny_llama, out, qa_file(tmp_path, 16), **LOADINGS[loading], optimizer=optimizer, learning_rate=2e-2,
          batch_size=8, gradient_accumulation_steps=1, epochs=6, force_epochs=True, validation_split=0)  # fmt: skip
    info = adapter_info(out)
    plan = info["plan"]
    assert (plan["load_in_4bit"], plan["load_in_8bit"]) == (loading == "qlora", loading == "8bit")
    assert plan["optimizer"] == optimizer
    losses = list(history(out).values())
    assert losses[-1] < losses[0] - 0.05, losses  # it learns, whatever holds the weights

    # the published adapter is plain peft in fp32, applied here to the unquantized base
    weights = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    before = logits(base, ids)
    tuned = PeftModel.from_pretrained(base, out / "lora")
    assert not torch.allclose(before, logits(tuned, ids), atol=1e-4)  # the adapter was trained, not left at zero


def test_an_interrupted_8bit_optimizer_run_resumes_on_the_same_curve(tmp_path: Path, tiny_llama: Path) -> None:
    """The 8-bit AdamW state (quantized moments and their scales) goes into the checkpoint and comes back."""
    data = qa_file(tmp_path, 32)
    # rank 64: bitsandbytes keeps tensors under 4096 elements in 32-bit state, so smaller ranks never quantize it
    flags = {"method": "qlora", "optimizer": "adamw_bnb_8bit", "lora_r": 64, "learning_rate": 1e-2, "batch_size": 4,
             "gradient_accumulation_steps": 1, "epochs": 2, "force_epochs": True, "validation_split": 0.25}  # fmt: skip
    whole = train(tiny_llama, tmp_path / "whole", data, **flags)
    part = train(tiny_llama, tmp_path / "parts", data, **flags, max_steps=7)
    assert part.steps == 7
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "last" / "training_state.pt", weights_only=False)
    moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in saved["optimizer"]["state"].values()]
    assert any(m.dtype == torch.uint8 for m in moments)  # 8-bit moments, saved as such
    resumed = resume(tiny_llama, tmp_path / "parts", data, **flags)
    assert resumed.steps == whole.steps == 12
    # the held-out loss is a function of the weights alone: after the resume it matches the uninterrupted run's
    whole_curve = history(tmp_path / "whole", "val_loss")
    after = {step: loss for step, loss in history(tmp_path / "parts", "val_loss").items() if step > 7}
    assert after.keys() & whole_curve.keys() and max(after) == 12, (after, whole_curve)
    assert after == pytest.approx({step: whole_curve[step] for step in after if step in whole_curve}, rel=1e-5)


def test_a_missing_bitsandbytes_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from llmbox_engine import quantized

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(UserError, match=r"--method qlora needs bitsandbytes, which is not installed.*pip install"):
        quantized.require("--method qlora", "cpu")


def test_bitsandbytes_without_a_gpu_for_a_gpu_plan_is_a_clear_error() -> None:
    from llmbox_engine import quantized

    quantized.require("--use-8bit", "cpu")  # the CPU backend quantizes here
    if torch.cuda.is_available():
        quantized.require("--use-8bit", "cuda:0")
    else:
        with pytest.raises(UserError, match="planned for a CUDA GPU, but none is visible"):
            quantized.require("--use-8bit", "cuda:0")


def test_serving_holds_the_base_as_the_adapter_was_trained(tmp_path: Path) -> None:
    from llmbox_engine.serve.loading import base_weights_for

    adapter = tmp_path / "lora"
    adapter.mkdir()
    assert base_weights_for("auto", adapter)[0] == "full"  # no adapter_info.json: not one of ours
    for plan, held in (({"load_in_4bit": True}, "4bit"), ({"load_in_8bit": True}, "8bit"), ({}, "full")):
        (adapter / "adapter_info.json").write_text(json.dumps({"plan": plan}))
        assert base_weights_for("auto", adapter)[0] == held
    assert base_weights_for("full", adapter) == ("full", "--base-weights")
    assert base_weights_for("auto", None)[0] == "full"
