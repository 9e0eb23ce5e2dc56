"""Packed rows on CPU: attention per example, no block-diagonal mask, the same numbers as each example alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmbox_engine.train import packed_attention
from llmbox_engine.train.packed_attention import example_bounds


def test_example_bounds_cut_a_packed_row_where_positions_restart() -> None:
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert example_bounds(packed, 9) == [0, 3, 5, 9]
    assert example_bounds(torch.arange(6)[None], 6) is None  # one example: plain causal SDPA does it
    assert example_bounds(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]), 4) is None  # a padded batch of rows
    assert example_bounds(torch.tensor([[5]]), 1) is None  # a generation step
    assert example_bounds(torch.tensor([[2, 3, 0, 1]]), 4) is None  # not the start of an example
    assert example_bounds(None, 4) is None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3", "phi3"])
def test_a_packed_row_gives_each_example_the_logits_it_gets_alone(
    family: str, tiny_model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_factory(family)), dtype=torch.float32, attn_implementation=packed_attention.register()
    ).eval()
    cuts: list[list[int]] = []

    def spied(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
        bounds = example_bounds(position_ids, length)
        if bounds:
            cuts.append(bounds)
        return bounds

    monkeypatch.setattr(packed_attention, "example_bounds", spied)
    generator = torch.Generator().manual_seed(0)
    # 90 tokens is longer than the tiny gemma3's 64-token sliding window: its local layers must still see only 64
    examples = [torch.randint(4, model.config.vocab_size, (n,), generator=generator) for n in (30, 90, 47)]
    with torch.no_grad():
        alone = [model(input_ids=ids[None]).logits[0] for ids in examples]
        assert not cuts  # one example per call: transformers' own SDPA
        packed = model(
            input_ids=torch.cat(examples)[None],
            position_ids=torch.cat([torch.arange(len(ids)) for ids in examples])[None],
        ).logits[0]
    assert cuts and cuts[0] == [0, 30, 120, 167]
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=1e-4)
