"""Names and paths the engine shows from inside a container are the host's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmbox_engine.host_view import host_path, model_name


def test_without_a_container_paths_and_names_are_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMBOX_HOST_PATHS", raising=False)
    monkeypatch.delenv("LLMBOX_MODEL_NAME", raising=False)
    assert host_path("/work/lora") == "/work/lora"
    assert model_name(Path("/home/u/.llmbox/models/qwen/model")) == "qwen"
    assert model_name(Path("/srv/qwen")) == "qwen"
    assert model_name(Path("/model")) == "model"  # never an empty model id


def test_container_paths_map_back_through_the_deepest_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = {"/work": "/home/u/m", "/work/sub": "/elsewhere", "/data/0": "/home/u/data"}
    monkeypatch.setenv("LLMBOX_HOST_PATHS", json.dumps(mounts))
    monkeypatch.setenv("LLMBOX_MODEL_NAME", "qwen")
    assert host_path("/work/lora") == "/home/u/m/lora"
    assert host_path(Path("/work/sub/x.png")) == "/elsewhere/x.png"
    assert host_path("/work") == "/home/u/m"
    assert host_path("/workshop/x") == "/workshop/x"  # a prefix of the name is not a parent folder
    assert host_path("/data/0/qa.json") == "/home/u/data/qa.json"
    assert model_name(Path("/model")) == "qwen"


def test_engine_train_writes_beside_an_installed_models_weights(tmp_path: Path) -> None:
    # the engine's own default output, without the host CLI's --output: where its `serve` looks for lora/
    from llmbox.errors import UserError
    from llmbox_engine.train.command import run_train

    weights = tmp_path / "qwen" / "model"
    weights.mkdir(parents=True)
    with pytest.raises(UserError, match=f"{tmp_path / 'qwen' / 'logs'}: no training logs yet"):
        run_train(weights, False, {"output": None, "tensorboard_only": 6006})
    bare = tmp_path / "bare-hf-folder"
    bare.mkdir()
    with pytest.raises(UserError, match=f"{bare / 'logs'}: no training logs yet"):
        run_train(bare, False, {"output": None, "tensorboard_only": 6006})
