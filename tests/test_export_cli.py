"""`llmbox export` as a user runs it: the files, the Ollama Modelfile, and clear refusals that leave nothing
half-written behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export_helpers import export
from llmbox.errors import UserError

from conftest import run_llmbox


@pytest.fixture
def model_home(trained: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> Path:
    """An installed-style model directory: model/ and the trained lora/."""
    model_dir, adapter_dir = trained("llama")
    home = tmp_path / "tiny-llama"
    shutil.copytree(model_dir, home / "model")
    shutil.copytree(adapter_dir, home / "lora")
    return home


def test_llmbox_export_writes_a_gguf_and_a_modelfile_and_refuses_to_overwrite(model_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "tiny.gguf"
    args = ["export", str(model_home), "--runtime", "local", "--format", "gguf", "--quant", "q8_0", "-o", str(out)]
    proc = run_llmbox(*args, "--ollama")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    assert f"ollama create tiny -f {out.parent / 'Modelfile'}" in proc.stdout
    modelfile = (out.parent / "Modelfile").read_text().splitlines()
    assert modelfile[0] == "FROM ./tiny.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and any(line.startswith("TEMPLATE") for line in modelfile)
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tiny.gguf"]  # nothing half-written

    before = out.stat().st_mtime_ns
    again = run_llmbox(*args)
    assert again.returncode != 0 and f"{out} exists: --force replaces it" in again.stderr
    assert "Traceback" not in again.stderr and out.stat().st_mtime_ns == before
    assert run_llmbox(*args, "--force").returncode == 0


def test_llmbox_export_without_a_trained_adapter_says_what_to_do(model_home: Path, tmp_path: Path) -> None:
    shutil.rmtree(model_home / "lora")
    proc = run_llmbox("export", str(model_home), "--runtime", "local", "--format", "hf", "-o", str(tmp_path / "m"))
    assert proc.returncode != 0 and "no trained adapter there" in proc.stderr and "--no-lora" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ({"format": "gguf", "quant": "q4_k_m"}, "llama-quantize"),
        ({"format": "hf", "ollama": True}, "--ollama takes --format gguf"),
        ({"format": "lora-gguf", "no_lora": True}, "leaves nothing to export"),
        ({"format": "gguf", "output": "model.bin"}, r"name it \*.gguf"),
        ({"format": "hf", "quant": "q8_0"}, "an hf export takes --dtype"),
        ({"format": "gguf", "dtype": "bf16"}, "a GGUF export takes --quant"),
    ],
)
def test_contradictory_requests_are_refused_before_loading_anything(asked: dict[str, Any], message: str) -> None:
    from llmbox.export_request import export_request

    values = {"output": "out.gguf", "dtype": "auto", "quant": "f16", "no_lora": False, "ollama": False,
              "force": False, **asked}  # fmt: skip
    with pytest.raises(UserError, match=message):
        export_request(values)


def test_gguf_of_an_unsupported_family_names_it(trained: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    model_dir, adapter_dir = trained("gpt2")
    with pytest.raises(UserError, match=r"GGUF export of the gpt2 family is not supported yet.*--format hf"):
        export(model_dir, adapter_dir, tmp_path / "out.gguf", "--format", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(
    trained: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, _ = trained("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match=r"embed_tokens.*not a LoRA pair.*--format gguf merges it"):
        export(model_dir, tmp_path / "adapter", tmp_path / "out" / "lora.gguf", "--format", "lora-gguf")
    assert not (tmp_path / "out" / "lora.gguf").exists()


def test_an_export_that_fails_midway_leaves_no_file(
    trained: Callable[[str], tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmbox_engine.export import gguf_file

    written: list[str] = []
    real = gguf_file._add_tensor

    def fail_at_the_fifth(writer: Any, name: str, *args: Any) -> None:
        written.append(name)
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        real(writer, name, *args)

    monkeypatch.setattr(gguf_file, "_add_tensor", fail_at_the_fifth)
    model_dir, adapter_dir = trained("llama")
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(OSError, match="No space left"):
        export(model_dir, adapter_dir, out, "--format", "gguf")
    assert list(out.parent.iterdir()) == []
