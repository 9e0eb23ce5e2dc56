"""Causal-LM loss computed only where there is a target, in chunks.

The usual path computes logits for every position (batch x length x vocabulary: with a 49k vocabulary
that is 200 KB per token in fp32) and then masks most of them away. Here the backbone's hidden states are
gathered at the positions that have a label, and the output head runs on those alone, in chunks, so
prompt and padding tokens cost no head FLOPs and the full logits tensor never exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)
from torch.utils.checkpoint import checkpoint

from llmbox_engine.data.render import IGNORE_INDEX

# what the backbone reads from a batch: the token fields, and a vision batch's pixels and token types
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "token_type_ids")


def split_head(model: Any) -> tuple[Any, Any, float | None]:
    """(backbone, output head, logit soft-cap) of a causal LM, unwrapping peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text_config = getattr(config, "text_config", None) or config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return base.base_model, base.get_output_embeddings(), softcap


def _chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def loss_sum(
    model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096, checkpoint_chunks: bool = False
) -> tuple[torch.Tensor, int]:
    """Summed token loss over the batch's targets, and how many targets there were."""
    backbone, head, softcap = split_head(model)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for a batch without targets
    hidden = hidden[:, :-1][selected]
    targets = targets[selected]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if checkpoint_chunks and torch.is_grad_enabled():
            # recompute the chunk's logits in backward instead of keeping them: bounded memory
            total = total + checkpoint(_chunk_loss, head, h, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, softcap)
    return total, count
