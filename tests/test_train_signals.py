"""Ctrl+C and SIGTERM during training save a usable adapter and exit 0; a second Ctrl+C aborts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, tensorboard_tags, write_json
from process_helpers import start_training, takes_ctrl_c
from train_helpers import finish, qa_records, wait_for


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_json(tmp_path / "qa.json", qa_records(40))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_exits_zero(
    tiny_llama: Path, tmp_path: Path, data: Path, sig: int
) -> None:
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data)
    wait_for(process, "eval   3")
    os.killpg(process.pid, sig)
    rest = finish(process)
    assert process.returncode == 0, rest
    name = signal.Signals(sig).name
    assert f"stopped: stopped by {name}" in rest
    info = json.loads((out / "lora" / "adapter_info.json").read_text())
    assert info["stop_reason"] == f"stopped by {name}"
    assert (out / "checkpoints" / "last" / "training_state.pt").is_file()


def loads_with_peft(base: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


def test_ctrl_c_through_the_host_cli_reaches_the_engine_once(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data, host_cli=True)
    wait_for(process, "eval   2")
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl+C: to every process of the foreground group
    rest = finish(process)
    assert process.returncode == 0, rest
    assert "stopped: stopped by SIGINT" in rest and "aborting" not in rest  # one Ctrl+C, one signal
    loads_with_peft(tiny_llama, out / "lora")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_llmbox_alone_stops_the_engine_cleanly(
    tiny_llama: Path, tmp_path: Path, data: Path, sig: int
) -> None:
    """What a pipeline does: `Popen.send_signal` to the llmbox process, not to a terminal's group."""
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data, host_cli=True)
    wait_for(process, "eval   2")
    process.send_signal(sig)
    rest = finish(process)
    name = signal.Signals(sig).name
    assert process.returncode == 0, rest
    assert f"stopped: stopped by {name}" in rest and "aborting" not in rest
    loads_with_peft(tiny_llama, out / "lora")


def test_a_second_ctrl_c_aborts_without_a_half_written_adapter(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    process = start_training(tiny_llama, out, data)
    wait_for(process, "eval   2")
    os.killpg(process.pid, signal.SIGINT)
    wait_for(process, "SIGINT: finishing this step")  # the first was handled; saving takes a while longer
    os.killpg(process.pid, signal.SIGINT)
    rest = finish(process)
    assert process.returncode == 130, rest
    assert "aborting" in rest
    lora = out / "lora"
    if lora.exists():  # published before the second signal landed: then it is whole
        assert {p.name for p in lora.iterdir()} >= {
            "adapter_config.json",
            "adapter_model.safetensors",
            "adapter_info.json",
        }
    assert not list(out.glob(".lora*"))


def stop_like_a_user(process: subprocess.Popen[bytes]) -> None:
    """Ctrl+C, and a second one if the first is slow to take (TensorBoard can be, on a loaded machine)."""
    for wait in (60, 30):
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    raise AssertionError("`llmbox train --tensorboard-only` outlived two Ctrl+C")


def test_tensorboard_only_serves_past_runs(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    from train_helpers import train

    out = tmp_path / "out"
    train(tiny_llama, out, data, max_steps=3)
    port = free_port()
    llmbox = str(Path(sys.executable).with_name("llmbox"))
    command = [llmbox, "train", str(tiny_llama), "--runtime", "local", "--data", "unused", "--output", str(out),
               "--tensorboard-only", str(port)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=takes_ctrl_c
    )
    try:
        expected = frozenset({"train/loss", "train/learning_rate", "train/grad_norm", "eval/val_loss"})
        run_tags = next(iter(tensorboard_tags(port, expected=expected).values()), {})
        assert expected <= set(run_tags)
    finally:
        stop_like_a_user(process)
