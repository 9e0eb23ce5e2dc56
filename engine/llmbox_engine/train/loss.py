"""Causal-LM loss computed only where there is a target, in chunks, with the head's gradient taken on the way.

The usual path computes logits for every position (batch x length x vocabulary: with a 49k vocabulary
that is 200 KB per token in fp32), masks most of them away, and keeps the logits and their log-softmax for
backward. Here the backbone's hidden states are gathered at the positions that have a label and the output
head runs on those alone. When the head is frozen (LoRA never trains it), `_HeadCrossEntropy` also computes
the gradient with respect to the hidden states during the forward pass, a small chunk at a time while that
chunk's logits are still in cache (softmax minus one-hot, times the head's weight, as Liger-Kernel's fused
linear cross-entropy does): no logits are kept for backward, and backward is one multiply by the incoming
gradient. A trainable head takes the plain path, in chunks, recomputed in backward when memory is tight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)
from torch.utils.checkpoint import checkpoint

from llmbox_engine.data.render import IGNORE_INDEX

# what the backbone reads from a batch: the token fields, and a vision batch's pixels and token types
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "token_type_ids")
# tokens per chunk of the fused head: 256 x a 49k vocabulary is 50 MB of fp32 logits, near cache-sized
FUSED_CHUNK_TOKENS = 256


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


class _HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) for a frozen `weight`; d/dhidden computed in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None
    ) -> torch.Tensor:
        device = hidden.device.type
        # under autocast the head multiplies in the autocast dtype, as the module call would
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], FUSED_CHUNK_TOKENS):
            h, t = hidden[start : start + FUSED_CHUNK_TOKENS].to(dtype), targets[start : start + FUSED_CHUNK_TOKENS]
            logits = (h @ w.T).float()
            capped = None
            if softcap:
                capped = torch.tanh(logits.div_(softcap))
                logits = capped * softcap
            # one fused pass for the log-probabilities: logsumexp would write exp(logits - max) to a new buffer
            log_probs = torch.log_softmax(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            total -= log_probs[rows, t].sum()
            if grad is None:
                continue
            probs = log_probs.exp_()  # softmax, in place
            probs[rows, t] -= 1.0
            if capped is not None:
                probs.mul_(1.0 - capped.square_())  # d(tanh(x / c) c)/dx = 1 - tanh^2
            grad[start : start + FUSED_CHUNK_TOKENS] = probs.to(dtype) @ w
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _fusable(head: torch.nn.Module) -> bool:
    if type(head) is not torch.nn.Linear:  # exactly: quantized subclasses keep their own forward
        return False
    return getattr(head, "bias", None) is None and not head.weight.requires_grad  # (stubs type bias as never None)


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
    if _fusable(head):
        fused: torch.Tensor = _HeadCrossEntropy.apply(hidden, head.weight, targets, softcap)
        return fused, count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if checkpoint_chunks and torch.is_grad_enabled():
            # recompute the chunk's logits in backward instead of keeping them: bounded memory
            total = total + checkpoint(_chunk_loss, head, h, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, softcap)
    return total, count


class LossModule(torch.nn.Module):
    """`loss_sum` as a module's forward: what DDP wraps, so that its gradient hooks run on our loss path."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], checkpoint_chunks: bool = False) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch, checkpoint_chunks=checkpoint_chunks)
