"""Reshaping the KV cache of a running batch: drop finished rows, trim shared left padding, join new rows.

Rows are left-padded, so every row's newest token sits in the last column and a new row can join by padding
the shorter of the two caches on the left. Joining and trimming need plain full-attention layers (each holding
`keys`/`values` of shape [batch, heads, seq, head_dim]); other caches (sliding windows, recurrent states) only
lose rows, and the worker admits new requests to them once the batch has drained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional


def can_join(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def keep_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep `rows` of the cache (in place) and of the attention mask (returned)."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    return mask.index_select(0, index)


def trim_left(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (after the longest rows finished)."""
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    if start == 0 or not can_join(cache):
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, start:, :]
        layer.values = layer.values[:, :, start:, :]
    return mask[:, start:]


def join(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Append `other`'s rows after `cache`'s; both are padded on the left to the same length."""
    length = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, length, 2), _pad_left(extra.keys, length, 2)])
        layer.values = torch.cat([_pad_left(layer.values, length, 2), _pad_left(extra.values, length, 2)])
    return cache, torch.cat([_pad_left(mask, length, 1), _pad_left(other_mask, length, 1)])


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    # F.pad lists (before, after) pairs from the last dimension backwards
    pads = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return functional.pad(tensor, pads)
