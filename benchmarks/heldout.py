"""The one held-out loss every contender is judged by: `python benchmarks/heldout.py SPEC.json`.

The held-out conversations are rendered by llmbox's Renderer (the same token ids and assistant masks for
everyone); each adapter is loaded with peft onto a fresh copy of the base model, and the loss is the mean
cross-entropy over the assistant tokens (each predicted from the tokens before it), in eval mode.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import read_json, render_with_llmbox, write_json

MAX_SEQ_LENGTH = 1024
BATCH_SIZE = 8


def heldout_loss(model: Any, examples: Sequence[Any], pad_token_id: int, device: str = "cpu") -> float:
    """Mean loss per assistant token over `examples` (llmbox TokenizedExamples), in batches of similar length.

    The output head runs only where there is a target, so the full logits are never built (same numbers).
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 (the universal alias)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = base.model, base.get_output_embeddings()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for begin in range(0, len(order), BATCH_SIZE):
            batch = _padded([examples[i] for i in order[begin : begin + BATCH_SIZE]], pad_token_id)
            ids, attention, targets = (t.to(device) for t in batch)
            hidden = backbone(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
            selected = targets[:, 1:]
            logits = head(hidden[:, :-1][selected]).float()
            total += float(F.cross_entropy(logits, ids[:, 1:][selected], reduction="sum"))
            count += int(selected.sum())
    return total / max(1, count)


def _padded(batch: Sequence[Any], pad_token_id: int) -> tuple[Any, Any, Any]:
    """Right-padded input ids, attention mask and target mask (a token is a target where llmbox trains on it)."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, e in enumerate(batch):
        ids[row, : len(e)] = torch.from_numpy(e.input_ids).long()
        attention[row, : len(e)] = 1
        targets[row, : len(e)] = torch.from_numpy(e.trainable)
    return ids, attention, targets


def load_model(model_dir: Path, adapter: Path | None, device: str = "cpu") -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # fp32 on every device: the judge is the same function whatever precision the contenders trained in
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    base.to(device)
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter))


def main(spec_path: str) -> None:
    """SPEC: {"model", "heldout_data", "adapters": {name: path or null for the base model}, "output", "device"?}."""
    from transformers import AutoTokenizer

    spec = read_json(Path(spec_path))
    model_dir = Path(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = render_with_llmbox(model_dir, spec["heldout_data"], tokenizer, MAX_SEQ_LENGTH)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = {}
    for name, adapter in spec["adapters"].items():
        device = spec.get("device", "cpu")
        model = load_model(model_dir, Path(adapter) if adapter else None, device)
        losses[name] = heldout_loss(model, examples, pad, device)
        print(f"{name}: held-out loss {losses[name]:.4f}", flush=True)
    write_json(Path(spec["output"]), {"examples": len(examples), "losses": losses})


if __name__ == "__main__":
    main(sys.argv[1])
