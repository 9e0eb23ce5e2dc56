"""The tiny random models of each family load like real ones, and their handler's target modules exist."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmbox.model_facts import read_config
from llmbox_handlers import match_handler

from tiny_models import FAMILIES

EXPECTED_HANDLER = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen",
    "gemma3": "gemma3",
    "gpt2": "gpt2",
    "phi3": "phi3",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_its_handler_and_targets_exist(family: str, tiny_model_factory: Callable[..., Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_factory(family)
    match = match_handler(read_config(folder))
    assert match.handler.name == EXPECTED_HANDLER[family]
    assert match.handler.name in match.reason
    model = AutoModelForCausalLM.from_pretrained(folder)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert match.handler.target_modules is not None
    assert set(match.handler.target_modules) <= leaf_names
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(ids) + 3


def test_unknown_family_falls_back_to_generic() -> None:
    match = match_handler({"model_type": "falcon"})
    assert match.handler.name == "generic" and match.handler.target_modules is None
    assert "'falcon'" in match.reason
