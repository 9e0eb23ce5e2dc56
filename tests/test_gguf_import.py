"""Importing a GGUF file gives a normal Hugging Face folder that loads and answers sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmbox.errors import UserError
from llmbox_engine.gguf_import import import_gguf


@pytest.mark.slow
def test_imported_smollm2_loads_with_plain_transformers_and_answers(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "model.safetensors").is_file()
    assert (
        json.loads((smollm2_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer, answer


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(UserError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    proc = run_llmbox_engine("import-gguf", str(fake), "--output", str(tmp_path / "out"))
    assert proc.returncode != 0 and "error: " in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def run_llmbox_engine(*args: str):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmbox_engine", *args], capture_output=True, text=True, timeout=300)
