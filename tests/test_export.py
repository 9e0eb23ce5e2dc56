"""`llmbox export` on tiny models of each supported family: the merged HF folder computes what base + adapter
computes through peft; the GGUF file, read back by transformers' own GGUF loader and by llama.cpp, computes it
too; the LoRA GGUF applied by llama.cpp over the base's GGUF gives the merged model's answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export_helpers import GGUF_FAMILIES, PROMPT, export, greedy, logits, prompt_ids, reference
from llama_cpp_reader import complete, llama_cpp_complete, llama_cpp_server, tokenize

from tiny_models import build_tiny_model

TEXTS = [PROMPT, "héllo wörld 🚀 3.14  two  spaces\nand a new line"]


@pytest.mark.parametrize("family", [*GGUF_FAMILIES, "gpt2", "phi3"])
def test_merged_hf_folder_computes_what_base_plus_adapter_computes(
    family: str, trained: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = trained(family)
    export(model_dir, adapter_dir, tmp_path / "merged", "--dtype", "f32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = prompt_ids(model_dir)
    expected, base = logits(reference(model_dir, adapter_dir), ids), logits(reference(model_dir, None), ids)
    assert (expected - base).abs().max() > 0.1  # the adapter matters, so agreeing below says something
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and tokenizer(PROMPT)["input_ids"] == ids
    provenance = json.loads((tmp_path / "merged" / "llmbox_export.json").read_text())
    assert provenance["adapter"]["fingerprint"] and provenance["base_model"]["fingerprint"]


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_reads_back_in_transformers_and_llama_cpp_as_the_merged_model(
    family: str, trained: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = trained(family)
    gguf = tmp_path / "gguf" / "model.gguf"  # alone in its folder: transformers would prefer a tokenizer.json
    export(model_dir, adapter_dir, gguf, "--format", "gguf", "--quant", "f32")
    ids = prompt_ids(model_dir)
    merged = reference(model_dir, adapter_dir)
    expected = logits(merged, ids)

    read_back = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    torch.testing.assert_close(logits(read_back, ids), expected, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(model_dir).chat_template

    original = AutoTokenizer.from_pretrained(model_dir)
    with llama_cpp_server(gguf) as url:
        # llama.cpp splits and merges text as the model's own tokenizer does; for the qwen2 architecture it splits
        # digits one by one whatever the file says (as every real Qwen2 tokenizer does, unlike this tiny one)
        for text in TEXTS if family != "qwen2" else [PROMPT]:
            assert tokenize(url, text) == original(text, add_special_tokens=False)["input_ids"], text
        run = complete(url, ids)
    assert run["tokens"] == greedy(merged, ids)
    log_probs = torch.log_softmax(expected[-1], dim=-1)
    for token, log_prob in run["top"]:
        assert log_prob == pytest.approx(log_probs[token].item(), abs=0.02)  # llama.cpp keeps its KV cache in f16


def test_a_sentencepiece_style_tokenizer_survives_the_gguf(tmp_path: Path) -> None:
    """BPE over "▁"-marked words with byte fallback (Llama 2, Mistral v1, Gemma) is GGUF's `llama` tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_model("llama", tmp_path / "model", sentencepiece_style=True)
    gguf = tmp_path / "gguf" / "model.gguf"
    export(model_dir, None, gguf, "--format", "gguf", "--quant", "f32")
    original = AutoTokenizer.from_pretrained(model_dir)
    read_back = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = original(PROMPT)["input_ids"]
    assert ids[0] == original.bos_token_id
    with llama_cpp_server(gguf) as url:
        for text in TEXTS:
            assert tokenize(url, text, add_special=True) == original(text)["input_ids"], text
            assert read_back(text)["input_ids"] == original(text)["input_ids"], text
        assert complete(url, ids)["tokens"] == greedy(reference(model_dir, None), ids)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    torch.testing.assert_close(logits(model, ids), logits(reference(model_dir, None), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_quantized_gguf_stays_close_to_the_merged_model(
    quant: str, trained: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = trained("llama")
    gguf = tmp_path / quant / "model.gguf"
    export(model_dir, adapter_dir, gguf, "--format", "gguf", "--quant", quant)
    ids = prompt_ids(model_dir)
    expected = logits(reference(model_dir, adapter_dir), ids)
    got = logits(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32), ids)
    # rounding moves the logits by a fraction of what the adapter moves them (a wrong layout moves them by more);
    # measured here: f16 0.001, q8_0 0.03, q4_0 0.3 of it
    adapter_effect = (expected - logits(reference(model_dir, None), ids)).abs().mean()
    error = ((got - expected).abs().mean() / adapter_effect).item()
    assert 0 < error < {"f16": 0.005, "q8_0": 0.05, "q4_0": 0.5}[quant], error


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_lora_gguf_over_the_base_gguf_in_llama_cpp_answers_as_the_merged_model(
    family: str, trained: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    model_dir, adapter_dir = trained(family)
    base_gguf, lora_gguf = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export(model_dir, None, base_gguf, "--format", "gguf", "--quant", "f32")
    export(model_dir, adapter_dir, lora_gguf, "--format", "lora-gguf", "--quant", "f32")
    ids = prompt_ids(model_dir)
    with_lora = llama_cpp_complete(base_gguf, ids, lora=lora_gguf)
    assert with_lora["tokens"] == greedy(reference(model_dir, adapter_dir), ids)
    alone = llama_cpp_complete(base_gguf, ids)  # the adapter changes what llama.cpp computes
    assert [(t, round(p, 2)) for t, p in with_lora["top"]] != [(t, round(p, 2)) for t, p in alone["top"]]
    log_probs = torch.log_softmax(logits(reference(model_dir, adapter_dir), ids)[-1], dim=-1)
    for token, log_prob in with_lora["top"]:
        assert log_prob == pytest.approx(log_probs[token].item(), abs=0.02)  # llama.cpp keeps its KV cache in f16
