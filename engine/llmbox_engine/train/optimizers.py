"""The optimizer the plan names, over the trainable (LoRA) parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmbox_engine import quantized


def make_optimizer(name: str, params: Sequence[Any], lr: float) -> Any:
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    bnb = quantized.import_bitsandbytes()
    # paged: state in CUDA unified memory, paged out under memory spikes; on a CPU it is plain memory
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=0.0)
