"""Training in several processes for real: `llmbox train --nproc-per-node 2` on CPU (torchrun, DDP over gloo).

Two processes on the same global batches must make the same updates as one; a signal to llmbox stops every
rank once with a saved adapter; a rank that dies ends the job with one error line naming it, never a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_llmbox, write_json
from process_helpers import command_line, descendants, start_training, wait_gone
from train_helpers import adapter_info, finish, qa_records, wait_for

# fp32 and no dropout: two runs that make the same updates end with the same numbers
EXACT = ["--precision", "fp32", "--lora-dropout", "0", "--learning-rate", "1e-2"]
# 3 micro-batches of 4 per step: the 2 processes take 2 and 1 passes, the second a pass without targets
BATCHES = ["--batch-size", "4", "--gradient-accumulation-steps", "3"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_json(tmp_path / "qa.json", qa_records(40))


def train_cli(model: Path, out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = run_llmbox("train", str(model), "--runtime", "local", "--data", str(data), "--output", str(out),
                      "--no-tensorboard", "--skip-test", *EXACT, *BATCHES, *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def evaluations(out: Path) -> list[dict[str, float]]:
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    return state["evaluations"]  # type: ignore[no-any-return]


def assert_same_run(a: Path, b: Path) -> None:
    for first, second in zip(evaluations(a), evaluations(b), strict=True):
        assert first["step"] == second["step"]
        assert first["train_loss"] == pytest.approx(second["train_loss"], rel=1e-5, abs=1e-6)
        assert first["val_loss"] == pytest.approx(second["val_loss"], rel=1e-5, abs=1e-6)
    one, two = load_file(a / "lora" / "adapter_model.safetensors"), load_file(b / "lora" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)  # summation order only


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_make_the_same_updates_as_one(
    tiny_llama: Path, tmp_path: Path, data: Path, strategy: str
) -> None:
    single = train_cli(tiny_llama, tmp_path / "one", data, "--max-steps", "4")
    double = train_cli(tiny_llama, tmp_path / "two", data, "--max-steps", "4", "--nproc-per-node", "2",
                       "--strategy", strategy)  # fmt: skip
    assert "1 (single)" in single.stdout and f"2 ({strategy})" in double.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")
    plan = adapter_info(tmp_path / "two")["plan"]
    assert (plan["strategy"], plan["world_size"]) == (strategy, 2)
    # one process prints: one plan, one status line per evaluation
    assert double.stdout.count("Training plan for") == 1 and double.stdout.count("eval   1 |") == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_after_a_two_process_run_continues_the_curve(
    tiny_llama: Path, tmp_path: Path, data: Path, strategy: str
) -> None:
    # the schedule spans the epochs, so a run stopped half-way and resumed follows the same curve
    epochs = ["--epochs", "2", "--force-epochs", "--nproc-per-node", "2", "--strategy", strategy]
    train_cli(tiny_llama, tmp_path / "whole", data, *epochs)
    train_cli(tiny_llama, tmp_path / "parts", data, *epochs, "--max-steps", "3")  # stopped half-way
    resumed = train_cli(tiny_llama, tmp_path / "parts", data, *epochs, "--resume")
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "whole", tmp_path / "parts")


def test_a_sharded_checkpoint_is_not_resumed_as_replicas(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    train_cli(tiny_llama, tmp_path / "out", data, "--max-steps", "1", "--nproc-per-node", "2", "--strategy", "fsdp2")
    proc = run_llmbox("train", str(tiny_llama), "--runtime", "local", "--data", str(data), "--output",
                      str(tmp_path / "out"), "--resume", "--no-tensorboard", "--skip-test")  # fmt: skip
    assert proc.returncode == 2
    assert "saved by a run with strategy fsdp2; this one plans single" in proc.stderr
    assert "resume with the same --nproc-per-node as that run" in proc.stderr


def test_sigint_to_llmbox_stops_every_rank_once_and_rank_0_saves(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data, "--nproc-per-node", "2", host_cli=True)
    wait_for(process, "eval   2", timeout=300)
    tree = descendants(process.pid)
    assert len(tree) == 3, [command_line(p) for p in tree]  # torchrun's agent and two workers
    process.send_signal(signal.SIGINT)
    rest = finish(process)
    assert process.returncode == 0, rest
    assert rest.count("SIGINT: finishing this step") == 1 and "aborting" not in rest and "Traceback" not in rest
    assert adapter_info(out)["stop_reason"] == "stopped by SIGINT"
    assert not wait_gone(tree, timeout=30)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "lora")


def test_a_killed_llmbox_stops_every_rank_which_save_first(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data, "--nproc-per-node", "2", host_cli=True)
    wait_for(process, "eval   2", timeout=300)
    tree = descendants(process.pid)
    process.kill()
    process.wait()
    left = wait_gone(tree, timeout=60)
    assert not left, [command_line(p) for p in left]
    assert adapter_info(out)["stop_reason"] == "stopped by SIGTERM"


def test_a_rank_that_dies_ends_the_job_with_one_error_naming_it(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    process = start_training(tiny_llama, tmp_path / "out", data, "--nproc-per-node", "2", host_cli=True)
    wait_for(process, "eval   2", timeout=300)
    tree = descendants(process.pid)
    workers = sorted(pid for pid in tree if "-u -m llmbox_engine" in command_line(pid))
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # pids in start order: rank 1 is the second
    rest = finish(process)
    assert process.returncode == 2, rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert errors == ["error: training process of rank 1 was killed by SIGKILL; the others were stopped"], rest
    assert "Traceback" not in rest
    assert not wait_gone(tree, timeout=60)
