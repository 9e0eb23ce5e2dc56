"""On the real SmolLM2-135M-Instruct: the served adapter answers exactly as plain transformers + peft do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_helpers import chat, running_server

from train_helpers import qa_file, train

PROMPTS = ["What is the capital of France?", "Name three colors.", "What is item 7?"]


@pytest.mark.slow
def test_served_greedy_answers_equal_transformers_and_peft(smollm2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train(smollm2_dir, out, qa_file(tmp_path, 16), max_steps=3, learning_rate=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "lora")
    model.eval()
    expected = []
    for prompt in PROMPTS:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=24, do_sample=False)
        expected.append(tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    del model, base

    args = ["--model-path", str(smollm2_dir), "--adapter-dir", str(out / "lora")]
    with running_server(args, tmp_path / "server.log") as server:
        client = server.client()
        model_id = f"{smollm2_dir.name}:lora"
        served = [chat(client, model_id, prompt, max_tokens=24).choices[0].message.content for prompt in PROMPTS]
        assert served == expected
        assert chat(client, smollm2_dir.name, PROMPTS[0], max_tokens=24).choices[0].message.content
