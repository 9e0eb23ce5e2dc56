"""LoRA dropout shared by the projections that read the same input: one mask per layer input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmbox_engine.train.model_setup import wrap_lora
from llmbox_engine.train.shared_dropout import SharedInputDropout, share_lora_dropout


def lora_model(path: Path, dropout: float) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model = wrap_lora(model, r=4, alpha=8, dropout=dropout, target_modules=None, gradient_checkpointing=False,
                      quantized=False)  # fmt: skip
    share_lora_dropout(model, dropout)  # as train/cpu_speed.py does when the plan says so
    return model


def lora_a_inputs(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each LoRA A matrix of the first layer reads (the input after dropout)."""
    seen: dict[str, torch.Tensor] = {}
    layer = model.get_base_model().model.layers[0]
    hooks = []

    def keep(projection: str) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...], _output: Any) -> None:  # None: output unchanged
            seen.setdefault(projection, args[0])

        return hook

    for name, module in layer.named_modules():
        if name.endswith("lora_A.default"):
            hooks.append(module.register_forward_hook(keep(name.split(".")[-3])))
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return seen


def test_sibling_projections_share_one_dropped_input(tiny_llama: Path) -> None:
    model = lora_model(tiny_llama, dropout=0.5)
    dropouts = {id(m) for m in model.modules() if isinstance(m, SharedInputDropout)}
    assert len(dropouts) == 1  # one module for every LoRA layer
    model.train()
    torch.manual_seed(0)
    seen = lora_a_inputs(model, torch.randint(0, 100, (2, 16)))
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]  # one mask for the attention input
    assert seen["gate_proj"] is seen["up_proj"]  # and one for the MLP input
    assert seen["o_proj"] is not seen["q_proj"] and seen["down_proj"] is not seen["gate_proj"]
    zeros = float((seen["q_proj"] == 0).float().mean())
    assert 0.4 < zeros < 0.6  # still dropout at the planned rate


def test_eval_mode_and_gradients(tiny_llama: Path) -> None:
    model = lora_model(tiny_llama, dropout=0.3)
    ids = torch.randint(0, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        seen = lora_a_inputs(model, ids)
    assert not (seen["q_proj"] == 0).any()  # eval: the input as it is
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # every A learns through the share


def test_no_dropout_means_no_shared_module(tiny_llama: Path) -> None:
    model = lora_model(tiny_llama, dropout=0.0)
    assert not any(isinstance(m, SharedInputDropout) for m in model.modules())


def test_cpu_dropout_rate_scale_and_gradient() -> None:
    from llmbox_engine.train.shared_dropout import cpu_dropout, keep_mask

    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1001]), 0.05)  # an odd size: the last word is cut
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    lanes = keep.flatten()[: 1000 * 1000].view(-1, 4).float()
    for lane in range(4):  # every 16-bit lane of a random word is uniform, or one lane would drop too often
        assert abs(1 - float(lanes[:, lane].mean()) - 0.05) < 0.002
    assert scale == 65536 / (65536 - 3277)
    x = (torch.rand(300, 700) + 0.5).requires_grad_()
    torch.manual_seed(1)
    y = cpu_dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(y, cpu_dropout(x, 0.3))  # reproducible under the seed
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * 65536 / (65536 - round(0.3 * 65536)))
    assert abs(float(y.detach().mean() / x.detach().mean()) - 1) < 0.01  # inverted dropout keeps the expectation
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through the kept elements alone, scaled
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 65536 / (65536 - round(0.3 * 65536))))
