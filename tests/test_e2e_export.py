"""On the real SmolLM2-135M-Instruct, with an adapter that learned a dozen facts: the exported GGUF answers them in
transformers' own GGUF loader and in llama.cpp, the LoRA GGUF over the base GGUF answers them in llama.cpp, and
`llmbox install exported.gguf` then `llmbox serve` answers them through the openai client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llama_cpp_reader import llama_cpp_complete
from serve_helpers import chat, running_server
from test_e2e_quantized import QUESTIONS, missed
from test_e2e_smollm2 import greedy_answers

from conftest import run_llmbox


@pytest.fixture(scope="module")
def merged_answers(smollm2_dir: Path, facts_home: Path) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, facts_home / "lora")
    answers = greedy_answers(tuned, AutoTokenizer.from_pretrained(smollm2_dir), QUESTIONS)
    assert not missed(answers), missed(answers)
    return answers


def export(home: Path, out: Path, *flags: str) -> None:
    proc = run_llmbox("export", str(home), "--runtime", "local", "-o", str(out), *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def llama_cpp_answers(gguf: Path, tokenizer: Any, lora: Path | None = None) -> list[str]:
    answers = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answers.append(llama_cpp_complete(gguf, ids, max_tokens=32, lora=lora, ignore_eos=False)["text"].strip())
    return answers


@pytest.mark.slow
def test_exported_gguf_answers_the_facts_in_transformers_and_llama_cpp(
    facts_home: Path, merged_answers: list[str], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "gguf" / "smollm2-facts.gguf"
    export(facts_home, gguf, "--format", "gguf", "--quant", "f16")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert greedy_answers(model, tokenizer, QUESTIONS) == merged_answers  # f16 of bf16 weights: the same model
    assert not missed(llama_cpp_answers(gguf, tokenizer))

    q8 = tmp_path / "q8" / "smollm2-facts-q8_0.gguf"
    export(facts_home, q8, "--format", "gguf", "--quant", "q8_0", "--ollama")
    assert q8.stat().st_size < gguf.stat().st_size * 0.6
    assert not missed(llama_cpp_answers(q8, tokenizer))


@pytest.mark.slow
def test_lora_gguf_over_the_base_gguf_answers_the_facts_in_llama_cpp(facts_home: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base, lora = tmp_path / "smollm2-base.gguf", tmp_path / "smollm2-facts-lora.gguf"
    export(facts_home, base, "--format", "gguf", "--no-lora")
    export(facts_home, lora, "--format", "lora-gguf")
    tokenizer = AutoTokenizer.from_pretrained(facts_home / "model")
    assert len(missed(llama_cpp_answers(base, tokenizer))) == len(QUESTIONS)  # the base alone knows none
    assert not missed(llama_cpp_answers(base, tokenizer, lora=lora))


@pytest.mark.slow
def test_installing_the_exported_gguf_and_serving_it_answers_the_facts(facts_home: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "smollm2-facts.gguf"
    export(facts_home, gguf, "--format", "gguf", "--quant", "q8_0")
    env = {"LLMBOX_HOME": str(tmp_path / "home")}
    installed = run_llmbox("install", str(gguf), "--name", "facts", env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    args = ["facts", "--runtime", "local", "--api-key", "k-test"]
    with running_server(args, tmp_path / "server.log", api_key="k-test", host_cli=True, env=env) as server:
        client = server.client(api_key="k-test")
        replies = [chat(client, "facts", question, max_tokens=32).choices[0].message.content for question in QUESTIONS]
    assert not missed(replies), missed(replies)
