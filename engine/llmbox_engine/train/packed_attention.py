"""Packed rows on CPU: causal SDPA run once per example instead of over a block-diagonal mask.

Packing (every example of a pass in one row, position ids restarting at 0) removes padding from every matmul
and element-wise op, but transformers' own SDPA path keeps packed examples apart with a dense block-diagonal
mask over the whole row, and a masked SDPA is slower than a causal one (benchmarks/README.md). flash-attention's
varlen kernels do this on a GPU; on CPU there are none. This attention function cuts the row at each restart of
the position ids and runs SDPA with `is_causal=True` on each example, so no mask is built and no padding is
computed anywhere. Calls that are not packed (generation, one example, a padded batch) go to transformers' SDPA.

`register()` adds it to transformers as `PACKED_SDPA`; a model loaded with that attention implementation then
takes packed batches (`data.batching.packed_batch`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)

PACKED_SDPA = "llmbox_packed_sdpa"


def example_bounds(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Start offsets of the packed examples in a one-row batch, plus the end; None unless there are several."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    if position_ids.shape[1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return [*starts, length]


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask that also hides keys `window` or more positions back (sliding-window layers)."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, T, d], key/value [1, kv heads, T, d]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = example_bounds(kwargs.get("position_ids"), query.shape[2])
    if bounds is None or key.shape[2] != query.shape[2] or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    outputs = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if window is not None and end - start > window:
            mask = _window_mask(end - start, window, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, dim=1), None  # [1, T, heads, d], as transformers' SDPA returns it


def register() -> str:
    """Make `PACKED_SDPA` an attention implementation transformers can load a model with; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # the unpacked calls need SDPA's masks; packed ones get a block-diagonal mask too, built once per forward
    # pass and not read
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
