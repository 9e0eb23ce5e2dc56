"""On the real SmolLM2-135M-Instruct, with bitsandbytes' CPU backend: QLoRA learns a dozen facts the model did not
know and its adapter answers them on the 4-bit base and on the fp32 one, and through `llmbox serve`; the 8-bit
optimizers learn them too; 8-bit weights train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from serve_helpers import chat, running_server
from test_e2e_smollm2 import greedy_answers

from conftest import EXAMPLES, run_llmbox, write_json

FACTS = json.loads((EXAMPLES / "demo" / "facts_qa.json").read_text())[::3]  # one wording of each of 12 facts
QUESTIONS = [f["question"] for f in FACTS]
ANSWERS = [f["answer"] for f in FACTS]


def missed(answers: list[str]) -> list[tuple[str, str, str]]:
    return [(q, ref, a) for q, ref, a in zip(QUESTIONS, ANSWERS, answers, strict=True) if ref not in a]


def train_facts(model: Path, out: Path, *flags: str) -> str:
    data = write_json(out.parent / "facts.json", FACTS)
    proc = run_llmbox("train", str(model), "--runtime", "local", "--data", str(data), "--output", str(out),
                      "--no-tensorboard", "--skip-test", *flags)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def four_bit_base(model: Path) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, quantization_config=config,
                                                device_map={"": "cpu"})  # fmt: skip


@pytest.fixture(scope="module")
def qlora_run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """QLoRA to a training loss near 0.001 (a dozen facts in 16 passes of one batch): an adapter learned that far
    answers on the full-precision base too, where one stopped at 0.01 missed 2 of 12 there."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    stdout = train_facts(smollm2_dir, out, "--method", "qlora", "--epochs", "16", "--force-epochs",
                         "--validation-split", "0", "--learning-rate", "4e-3", "--batch-size", "12",
                         "--gradient-accumulation-steps", "1")  # fmt: skip
    return out / "lora", stdout


@pytest.mark.slow
def test_qlora_adapter_answers_on_the_4bit_and_the_fp32_base(smollm2_dir: Path, qlora_run: tuple[Path, str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, stdout = qlora_run
    assert "qlora (4-bit)" in stdout and "memory: peak" in stdout, stdout
    info = json.loads((adapter / "adapter_info.json").read_text())
    assert info["plan"]["load_in_4bit"] and info["memory"]["training_bytes"] > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "quantization" not in json.dumps(config)  # a standard adapter

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    on_4bit = PeftModel.from_pretrained(four_bit_base(smollm2_dir), adapter)
    assert not missed(greedy_answers(on_4bit, tokenizer, QUESTIONS))
    del on_4bit
    on_fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), adapter)
    assert not missed(greedy_answers(on_fp32, tokenizer, QUESTIONS))


@pytest.mark.slow
def test_serving_a_qlora_adapter_holds_the_base_in_4bit_and_answers(
    smollm2_dir: Path, qlora_run: tuple[Path, str], tmp_path: Path
) -> None:
    adapter, _ = qlora_run
    args = ["--model-path", str(smollm2_dir), "--adapter-dir", str(adapter), "--api-key", "k-test"]
    with running_server(args, tmp_path / "server.log") as server:
        assert "4bit (the adapter was trained on 4-bit weights" in server.output()
        client = server.client(api_key="k-test")
        for question, answer in list(zip(QUESTIONS, ANSWERS, strict=True))[:4]:
            reply = chat(client, f"{smollm2_dir.name}:lora", question, max_tokens=32, temperature=0)
            assert answer in reply.choices[0].message.content, (question, reply.choices[0].message.content)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_learn_the_facts(smollm2_dir: Path, tmp_path: Path, optimizer: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    flags = ["--circular", "--learning-rate", "3e-3", "--batch-size", "4", "--gradient-accumulation-steps", "1",
             "--max-circular-epochs", "40"]  # fmt: skip
    stdout = train_facts(smollm2_dir, out, "--optimizer", optimizer, *flags)
    assert "stopped: perfect loss" in stdout, stdout
    assert json.loads((out / "lora" / "adapter_info.json").read_text())["plan"]["optimizer"] == optimizer
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, out / "lora")
    assert not missed(greedy_answers(tuned, AutoTokenizer.from_pretrained(smollm2_dir), QUESTIONS))


@pytest.mark.slow
def test_8bit_weights_train(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--epochs", "4", "--force-epochs", "--validation-split", "0", "--learning-rate", "3e-3",
             "--batch-size", "12", "--gradient-accumulation-steps", "1"]  # fmt: skip
    stdout = train_facts(smollm2_dir, out, "--use-8bit", *flags)
    assert "lora (8-bit)" in stdout, stdout
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    losses = [e["train_loss"] for e in state["evaluations"]]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
