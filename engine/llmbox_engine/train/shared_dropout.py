"""LoRA dropout drawn once per layer input, not once per projection.

peft gives every adapted projection its own `nn.Dropout`, so q, k and v (and gate and up), which read the same
hidden states, each draw a mask, write a dropped copy of the input, keep that copy for backward and multiply by
the mask again in backward. On CPU that is about 15% of a SmolLM2 step (benchmarks/README.md), and the copies
are memory held per token. Here every LoRA layer of the model shares one dropout module that remembers the last
input it dropped: projections reading the same tensor get the same dropped tensor, so one mask, one saved copy
and one backward multiply serve them all, as fused-QKV LoRA kernels do. Each projection still sees dropout at
the planned rate; what changes is that sibling projections' masks are no longer independent.
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
        dropped = F.dropout(x, self.p, training=True)
        self._last = (x, dropped)
        return dropped

    def extra_repr(self) -> str:
        return f"p={self.p}, shared by every LoRA layer"


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
