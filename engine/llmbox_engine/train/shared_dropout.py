"""LoRA dropout drawn once per layer input, not once per projection.

peft gives every adapted projection its own `nn.Dropout`, so q, k and v (and gate and up), which read the same
hidden states, each draw a mask, write a dropped copy of the input, keep that copy for backward and multiply by
the mask again in backward. On CPU that is about 15% of a SmolLM2 step (benchmarks/README.md), and the copies
are memory held per token. Here every LoRA layer of the model shares one dropout module that remembers the last
input it dropped: projections reading the same tensor get the same dropped tensor, so one mask, one saved copy
and one backward multiply serve them all, as fused-QKV LoRA kernels do. Each projection still sees dropout at
the planned rate; what changes is that sibling projections' masks are no longer independent.

On CPU the mask itself is the other cost: `F.dropout` draws one Bernoulli sample per element (about 8 ns each
here, 10% of a SmolLM2 step). `cpu_dropout` cuts four 16-bit uniforms out of each 64-bit random word instead,
four times fewer generator calls and a quarter of the time (benchmarks/profile_train_step.py). The rate is
rounded to a multiple of 1/65536 and the scale follows the rounded rate, so the expectation is still exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)
from torch import nn


class SharedInputDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # the last input and its dropped copy; identity (`is`) is the key, and holding the input keeps its
        # memory from being reused by another tensor while the entry lives
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        last = self._last
        if last is not None and last[0] is x:
            return last[1]
        dropped = cpu_dropout(x, self.p) if x.device.type == "cpu" else F.dropout(x, self.p, training=True)
        self._last = (x, dropped)
        return dropped

    def extra_repr(self) -> str:
        return f"p={self.p}, shared by every LoRA layer"


_LANES = 1 << 16


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability 1 - p (p rounded to 1/65536), and its scale."""
    drop = round(p * _LANES)
    if not 0 <= drop < _LANES:
        raise ValueError(f"dropout rate {p} is outside [0, 1)")
    numel = shape.numel()
    # randint over the whole int64 range: each of a word's four 16-bit lanes is uniform (the test checks)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (-(-numel // 4),), dtype=torch.int64)
    lanes = words.view(torch.int16)[:numel]
    keep = lanes >= drop - (_LANES >> 1)  # int16 lanes run from -32768: `drop` of them fall below this
    return keep.view(shape), _LANES / (_LANES - drop)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)  # one byte per element, as F.dropout keeps
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with the packed-uniform mask of `keep_mask`: F.dropout's result, at a quarter of the cost."""
    keep, scale = keep_mask(x.shape, p)
    result: torch.Tensor = _MaskedScale.apply(x, keep, scale)
    return result


def share_lora_dropout(model: Any, p: float) -> SharedInputDropout | None:
    """Replace each LoRA layer's dropout by one shared module; None when there is no dropout to share."""
    if p <= 0:
        return None
    shared = SharedInputDropout(p)
    replaced = 0
    for module in list(model.modules()):
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name in list(dropouts.keys()):
                dropouts[name] = shared
                replaced += 1
    return shared if replaced else None
