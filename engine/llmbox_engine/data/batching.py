"""Batches without padding to a fixed length.

Two ways, and the trainer picks one:
- length-grouped batches built to a token budget: examples sorted by length are cut into batches whose
  padded size (rows x longest row) stays under the budget, and the batches are shuffled, so padding is
  small, memory is bounded and the order is still random between batches;
- packed batches: examples concatenated into one row with position ids restarting at 0, so nothing
  is padded. Attention that reads the position ids keeps examples apart: flash-attention's varlen kernels on
  a GPU, `train.packed_attention` (SDPA per example) on CPU. transformers' own SDPA would build a dense
  block-diagonal mask instead, which costs more than it saves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmbox_engine.data.render import IGNORE_INDEX, TokenizedExample


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int, seed: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length, each with rows x longest <= max_tokens.

    A single example longer than the budget gets a batch of its own. `seed=None` keeps the sorted order.
    """
    if max_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_tokens and max_batch_size must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newcomer is the longest
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def split_to_budget(
    batch: Sequence[int], lengths: Sequence[int], max_tokens: int, packed: bool = False
) -> list[list[int]]:
    """`batch` cut into consecutive pieces that stay under `max_tokens` (a row over it alone).

    A padded piece costs rows x longest row, a packed one the sum of its rows. Rows keep their order, so a batch
    from `token_budget_batches` (ascending lengths) splits with the least padding.
    """
    pieces: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in batch:
        wider, more = max(longest, lengths[i]), total + lengths[i]
        cost = more if packed else (len(current) + 1) * wider
        if current and cost > max_tokens:
            pieces.append(current)
            current, wider, more = [], lengths[i], lengths[i]
        current.append(i)
        longest, total = wider, more
    if current:
        pieces.append(current)
    return pieces


def padded_batch(examples: Sequence[TokenizedExample], pad_token_id: int, multiple_of: int = 1) -> dict[str, Any]:
    """Right-padded to the longest row (rounded up to `multiple_of`), padding masked out of attention and loss."""
    import torch

    longest = max(len(e) for e in examples)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = np.full((len(examples), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(examples), width), dtype=np.int64)
    for row, ex in enumerate(examples):
        n = len(ex)
        input_ids[row, :n] = ex.input_ids
        labels[row, :n] = np.where(ex.trainable, ex.input_ids, IGNORE_INDEX)
        attention[row, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
    }


def packed_batch(examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """One row holding every example, position ids restarting at each example's start.

    The model shifts labels by one inside its loss, so the first label of each example would be
    predicted from the previous example's last token: it is masked, so no target crosses a boundary.
    """
    import torch

    ids = np.concatenate([e.input_ids for e in examples]).astype(np.int64)
    labels = np.concatenate([np.where(e.trainable, e.input_ids, IGNORE_INDEX) for e in examples]).astype(np.int64)
    positions = np.concatenate([np.arange(len(e), dtype=np.int64) for e in examples])
    starts = np.cumsum([0] + [len(e) for e in examples[:-1]])
    labels[starts] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "labels": torch.from_numpy(labels)[None],
    }
