"""The frozen-head cross-entropy: the loss and hidden-state gradient of the plain head + cross_entropy path."""

from __future__ import annotations

import pytest
import torch

from llmbox_engine.train import loss as loss_module
from llmbox_engine.train.loss import _chunk_loss, _fusable, _HeadCrossEntropy


def _frozen_head(weight: torch.Tensor) -> torch.nn.Linear:
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return head


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_loss_and_gradient_match_the_plain_path(
    softcap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss_module, "FUSED_CHUNK_TOKENS", 16)  # 50 tokens: three full chunks and a short one
    torch.manual_seed(0)
    weight = torch.randn(300, 24, dtype=torch.float64)
    hidden = torch.randn(50, 24, dtype=torch.float64)
    targets = torch.randint(0, 300, (50,))
    plain_in, fused_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    plain = _chunk_loss(_frozen_head(weight), plain_in, targets, softcap)  # the path a trainable head takes
    fused = _HeadCrossEntropy.apply(fused_in, weight, targets, softcap)
    (2.5 * plain).backward()  # an upstream gradient other than 1 must scale the saved one
    (2.5 * fused).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert plain_in.grad is not None and fused_in.grad is not None
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=1e-4, atol=1e-5)  # logits are fp32 on both paths


def test_fused_head_multiplies_in_the_autocast_dtype_and_skips_the_gradient_without_grad() -> None:
    torch.manual_seed(0)
    weight = torch.randn(200, 32).to(torch.bfloat16)
    hidden, targets = torch.randn(40, 32), torch.randint(0, 200, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _chunk_loss(_frozen_head(weight), hidden, targets, None)  # autocast casts the input
        with torch.no_grad():
            fused = _HeadCrossEntropy.apply(hidden, weight, targets, None)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-3)
    assert not fused.requires_grad


def test_only_a_frozen_bias_free_linear_head_takes_the_fused_path() -> None:
    head = torch.nn.Linear(8, 16, bias=False)
    assert not _fusable(head)  # a trainable head needs its weight gradient: the plain path computes it
    head.weight.requires_grad_(False)
    assert _fusable(head)
    assert not _fusable(torch.nn.Linear(8, 16).requires_grad_(False))
