"""`llmbox install` makes a model directory (with train.sh/start.sh); `llmbox list` shows what is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmbox.install import default_name

from conftest import run_llmbox


def test_install_a_local_folder_then_list_it(tmp_path: Path, tiny_llama: Path) -> None:
    env = {"LLMBOX_HOME": str(tmp_path / "home")}
    proc = run_llmbox("install", str(tiny_llama), "--name", "tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    home = tmp_path / "home" / "models" / "tiny"
    assert (home / "model" / "config.json").is_file() and (home / "model" / "model.safetensors").is_file()
    assert os.access(home / "train.sh", os.X_OK) and "llmbox train ." in (home / "train.sh").read_text()
    assert "llmbox serve ." in (home / "start.sh").read_text()
    listing = run_llmbox("list", env=env)
    assert listing.returncode == 0 and "tiny" in listing.stdout and "llama" in listing.stdout
    assert " no " in listing.stdout  # no adapter yet

    again = run_llmbox("install", str(tiny_llama), "--name", "tiny", env=env)
    assert again.returncode != 0 and "already holds a model" in again.stderr

    # a fake published adapter shows up with its loss
    (home / "lora").mkdir()
    (home / "lora" / "adapter_info.json").write_text(json.dumps({"final_val_loss": 1.2345}))
    assert "1.2345" in run_llmbox("list", env=env).stdout


def test_train_sh_runs_llmbox_train_in_place(tmp_path: Path, tiny_llama: Path) -> None:
    env = {"LLMBOX_HOME": str(tmp_path / "home")}
    assert run_llmbox("install", str(tiny_llama), "--name", "tiny", env=env).returncode == 0
    home = tmp_path / "home" / "models" / "tiny"
    llmbox_bin = Path(sys.executable).parent
    proc = subprocess.run(
        [str(home / "train.sh"), "--data", "nowhere.json", "--runtime", "local"],
        capture_output=True, text=True, env={**os.environ, **env, "PATH": f"{llmbox_bin}:{os.environ['PATH']}"},
    )  # fmt: skip
    # it reached the engine with the model directory resolved: the error is about the data, not the model
    assert proc.returncode != 0 and "nowhere.json: no such file or folder" in proc.stderr


def test_an_unreachable_hub_id_is_a_clear_error(tmp_path: Path) -> None:
    env = {"LLMBOX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_llmbox("install", "some-org/some-model", env=env)
    assert proc.returncode != 0 and "error: some-org/some-model: download failed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_names() -> None:
    assert default_name("Qwen/Qwen2.5-0.5B") == "qwen2.5-0.5b"
    assert default_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert default_name("./my model/") == "my-model"
