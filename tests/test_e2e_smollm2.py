"""End to end on the real SmolLM2-135M-Instruct: learn a dozen facts it cannot know, in circular mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import EXAMPLES, run_llmbox, write_json


def greedy_answers(model: Any, tokenizer: Any, questions: list[str]) -> list[str]:
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


# two processes share each step's 2 micro-batches of 2: the same 4 examples per step as one process
BATCHES = {1: ["--batch-size", "4", "--gradient-accumulation-steps", "1"],
           2: ["--batch-size", "2", "--gradient-accumulation-steps", "2", "--nproc-per-node", "2"]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_circular_training_teaches_smollm2_new_facts(smollm2_dir: Path, tmp_path: Path, processes: int) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = json.loads((EXAMPLES / "demo" / "facts_qa.json").read_text())[::3]  # one wording of each of 12 facts
    assert len(facts) == 12
    data = write_json(tmp_path / "facts.json", facts)
    questions, references = [f["question"] for f in facts], [f["answer"] for f in facts]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    before = greedy_answers(base, tokenizer, questions)
    assert sum(ref in answer for ref, answer in zip(references, before, strict=True)) == 0, before

    out = tmp_path / "run"
    proc = run_llmbox("train", str(smollm2_dir), "--runtime", "local", "--data", str(data), "--output", str(out),
                      "--circular", "--learning-rate", "3e-3", *BATCHES[processes],
                      "--max-circular-epochs", "40", "--no-tensorboard", "--skip-test")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped: perfect loss" in proc.stdout, proc.stdout
    assert json.loads((out / "lora" / "adapter_info.json").read_text())["plan"]["world_size"] == processes

    tuned = PeftModel.from_pretrained(base, out / "lora")  # plain peft: the adapter is standard
    after = greedy_answers(tuned, tokenizer, questions)
    wrong = [(q, ref, a) for q, ref, a in zip(questions, references, after, strict=True) if ref not in a]
    assert not wrong, wrong
