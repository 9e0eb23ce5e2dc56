"""`llmbox serve --engine vllm` without vLLM running: the choice of engine, the adapter checks, vLLM's command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmbox.errors import UserError
from llmbox.serve_engine import check_engine_options, choose_serve_engine, is_vision_model
from llmbox_engine.serve.watch import AdapterError
from llmbox_engine.serve_vllm.adapter import check_for_vllm, max_lora_rank, snapshot
from llmbox_engine.serve_vllm.command import VllmLaunch, parse_extra_args, vllm_argv, vllm_env

from conftest import run_llmbox

PREFIX = "base_model.model.model.layers.0.self_attn"


def write_adapter(folder: Path, config: dict[str, object] | None = None, **tensors: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(base | (config or {})))
    weights = tensors or {f"{PREFIX}.q_proj.lora_A.weight": torch.zeros(8, 32),
                          f"{PREFIX}.q_proj.lora_B.weight": torch.zeros(32, 8)}  # fmt: skip
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("asked", "vllm", "gpus", "images", "engine", "why"),
    [
        ("auto", True, True, False, "vllm", "a GPU and vLLM"),
        ("auto", True, False, False, "llmbox", "no GPU"),
        ("auto", False, True, False, "llmbox", "vLLM is not installed"),
        ("auto", True, True, True, "llmbox", "--image-dir"),
        ("llmbox", True, True, False, "llmbox", "--engine llmbox"),
        ("vllm", True, False, False, "vllm", "--engine vllm"),
    ],
)
def test_the_engine_choice_and_its_reason(
    asked: str, vllm: bool, gpus: bool, images: bool, engine: str, why: str
) -> None:
    chosen, reason = choose_serve_engine(asked, vllm_installed=vllm, gpus=gpus, images=images)
    assert chosen == engine and why in reason


def test_auto_keeps_vision_models_on_llmbox_unless_vllm_is_asked_for() -> None:
    assert is_vision_model({"model_type": "gemma3", "vision_config": {}})
    assert not is_vision_model({"model_type": "llama"})
    chosen, why = choose_serve_engine("auto", vllm_installed=True, gpus=True, images=False, vision=True)
    assert chosen == "llmbox" and "vision model" in why
    assert choose_serve_engine("vllm", vllm_installed=True, gpus=True, images=False, vision=True)[0] == "vllm"


def test_asking_for_vllm_where_it_cannot_run_is_explained() -> None:
    with pytest.raises(UserError, match=r"vLLM is not installed.*LLMBOX_VLLM_PYTHON"):
        choose_serve_engine("vllm", vllm_installed=False, gpus=True, images=False)
    with pytest.raises(UserError, match=r"--image-dir.*--engine llmbox only"):
        choose_serve_engine("vllm", vllm_installed=True, gpus=True, images=True)


def test_an_option_of_the_other_engine_is_refused_by_name() -> None:
    with pytest.raises(UserError, match="--max-lora-rank is an option of --engine vllm; this server runs on llmbox"):
        check_engine_options("llmbox", {"max_lora_rank": 16})
    with pytest.raises(UserError, match="--base-weights is an option of --engine llmbox"):
        check_engine_options("vllm", {"base_weights": "4bit"})
    check_engine_options("vllm", {"base_weights": "auto", "max_lora_rank": 16, "vllm_args": "--seed 1"})


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (33, 64), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_value_vllm_accepts(rank: int, expected: int) -> None:
    assert max_lora_rank(rank) == expected


def test_a_rank_beyond_vllms_largest_is_refused() -> None:
    with pytest.raises(AdapterError, match="above vLLM's largest --max-lora-rank"):
        max_lora_rank(1024)


def test_the_rank_is_read_from_the_weights_including_a_rank_pattern(tmp_path: Path) -> None:
    folder = write_adapter(
        tmp_path / "a",
        {"rank_pattern": {"v_proj": 24}},
        **{f"{PREFIX}.q_proj.lora_A.weight": torch.zeros(8, 32), f"{PREFIX}.q_proj.lora_B.weight": torch.zeros(32, 8),
           f"{PREFIX}.v_proj.lora_A.weight": torch.zeros(24, 32),
           f"{PREFIX}.v_proj.lora_B.weight": torch.zeros(32, 24)},
    )  # fmt: skip
    assert check_for_vllm(folder) == 24


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save \(lm_head\).*--engine llmbox.*llmbox export"),
        ({"use_dora": True}, None, "DoRA.*--engine llmbox"),
        ({"peft_type": "IA3"}, None, "a IA3 adapter; vLLM serves LoRA adapters only"),
        (None, {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 32)}, r"output head \(lm_head\)"),
        (None, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 32)}, "embeddings"),
        (None, {"base_model.model.model.norm.weight": torch.zeros(32)}, "not a LoRA weight"),
    ],
)
def test_an_adapter_vllm_cannot_take_is_refused_naming_the_module(
    tmp_path: Path, config: dict[str, object] | None, tensors: dict[str, torch.Tensor] | None, message: str
) -> None:
    folder = write_adapter(tmp_path / "a", config, **(tensors or {}))
    with pytest.raises(AdapterError, match=message):
        check_for_vllm(folder)


def test_a_truncated_weights_file_is_refused(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        check_for_vllm(folder)


def test_a_snapshot_is_a_checked_copy_that_outlives_the_next_publish(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "lora")
    (folder / "adapter_info.json").write_text(json.dumps({"created_at": "2026-12-01T10:00:00"}))
    taken = snapshot(folder, tmp_path / "snapshots" / "v1")
    assert taken.rank == 8 and taken.info["created_at"] == "2026-12-01T10:00:00"
    assert sorted(p.name for p in taken.path.iterdir()) == sorted(p.name for p in folder.iterdir())
    write_adapter(folder, {"r": 16}, **{f"{PREFIX}.q_proj.lora_A.weight": torch.zeros(16, 32),
                                       f"{PREFIX}.q_proj.lora_B.weight": torch.zeros(32, 16)})  # fmt: skip
    assert json.loads((taken.path / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(AdapterError, match="no such folder"):
        snapshot(tmp_path / "missing", tmp_path / "snapshots" / "v2")


def test_vllms_command_carries_the_names_and_no_secret(tmp_path: Path) -> None:
    launch = VllmLaunch(python="/venv/bin/python", model_path=tmp_path / "model", served_name="smol", host="127.0.0.1",
                        port=8000, lora_rank=16, first_adapter=tmp_path / "snap, v=1", tensor_parallel_size=2,
                        extra_args=("--seed", "3"))  # fmt: skip
    argv = vllm_argv(launch)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") + 1] == "smol"
    assert argv[argv.index("--max-lora-rank") + 1] == "16" and argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and argv[-2:] == ["--seed", "3"]
    module = json.loads(argv[argv.index("--lora-modules") + 1])  # a path with "," and "=" survives as JSON
    assert module == {"name": "smol:lora", "path": str(tmp_path / "snap, v=1"), "base_model_name": "smol"}
    assert not any("key" in arg.lower() for arg in argv)
    no_lora = vllm_argv(VllmLaunch(python="p", model_path=tmp_path, served_name="smol", host="h", port=1))
    assert "--enable-lora" not in no_lora and "--lora-modules" not in no_lora


def test_vllms_environment_holds_the_key_and_a_cpu_cache_size() -> None:
    env = vllm_env({"PATH": "/bin", "VLLM_API_KEY": "stale"}, "k-1", lora=True, cpu=True)
    assert env["VLLM_API_KEY"] == "k-1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert vllm_env({"VLLM_CPU_KVCACHE_SPACE": "6"}, None, lora=False, cpu=True)["VLLM_CPU_KVCACHE_SPACE"] == "6"
    gpu = vllm_env({"VLLM_API_KEY": "stale"}, None, lora=False, cpu=False)
    assert "VLLM_API_KEY" not in gpu and "VLLM_CPU_KVCACHE_SPACE" not in gpu
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in gpu


def test_vllm_flags_llmbox_owns_are_refused_in_vllm_args() -> None:
    assert parse_extra_args("--gpu-memory-utilization 0.8 --seed=2") == ("--gpu-memory-utilization", "0.8", "--seed=2")
    with pytest.raises(UserError, match=r"--api-key is set by llmbox serve.*LLMBOX_API_KEY"):
        parse_extra_args("--api-key=secret")
    with pytest.raises(UserError, match="--port is set by llmbox serve"):
        parse_extra_args("--port 9")


def test_the_cli_refuses_options_of_the_other_engine(tiny_llama: Path) -> None:
    given = {"LLMBOX_VLLM_PYTHON": sys.executable}  # checked for existence only: nothing starts
    proc = run_llmbox("serve", str(tiny_llama), "--runtime", "local", "--engine", "vllm", "--threads", "2", env=given)
    assert proc.returncode != 0
    assert "--threads is an option of --engine llmbox; this server runs on vllm" in proc.stderr, proc.stderr
    proc = run_llmbox("serve", str(tiny_llama), "--runtime", "local", "--engine", "llmbox", "--max-lora-rank", "8")
    assert proc.returncode != 0 and "--max-lora-rank is an option of --engine vllm" in proc.stderr, proc.stderr


def test_vllm_asked_for_where_this_python_lacks_it_names_the_ways_out(tiny_llama: Path) -> None:
    proc = run_llmbox("serve", str(tiny_llama), "--runtime", "local", "--engine", "vllm",
                      env={"LLMBOX_VLLM_PYTHON": ""})  # fmt: skip
    assert proc.returncode != 0 and "vLLM is not installed" in proc.stderr and "LLMBOX_VLLM_PYTHON" in proc.stderr
    proc = run_llmbox("serve", str(tiny_llama), "--runtime", "local", "--engine", "vllm",
                      env={"LLMBOX_VLLM_PYTHON": "/nonexistent/python"})  # fmt: skip
    assert proc.returncode != 0 and "LLMBOX_VLLM_PYTHON=/nonexistent/python: no such program" in proc.stderr


def test_dtype_auto_means_float32_on_a_cpu_for_vllm_too() -> None:
    from llmbox_engine.cli import vllm_dtype

    assert vllm_dtype("auto", cpu=True) == "float32"
    assert vllm_dtype("auto", cpu=False) == "auto" and vllm_dtype("bfloat16", cpu=True) == "bfloat16"


def test_an_adapter_ranked_beyond_vllms_largest_is_refused_before_launch(tmp_path: Path) -> None:
    a, b = f"{PREFIX}.q_proj.lora_A.weight", f"{PREFIX}.q_proj.lora_B.weight"
    wide = {a: torch.zeros(1024, 4), b: torch.zeros(4, 1024)}
    folder = write_adapter(tmp_path / "a", {"r": 1024}, **wide)
    with pytest.raises(AdapterError, match="1024 is above vLLM's largest --max-lora-rank"):
        check_for_vllm(folder)


def test_a_max_lora_rank_vllm_would_refuse_is_an_error_before_launch(tiny_llama: Path) -> None:
    given = {"LLMBOX_VLLM_PYTHON": sys.executable}  # nothing starts: the value is refused first
    proc = run_llmbox("serve", str(tiny_llama), "--runtime", "local", "--engine", "vllm", "--max-lora-rank", "12",
                      env=given)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--max-lora-rank 12: vLLM takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512" in proc.stderr, proc.stderr
