"""Many GPUs (`make test-gpu` on a machine with two or more): DDP over NCCL makes the same updates as one GPU.

On a one-GPU machine these cases cannot run, and say so; the CPU suite runs the same paths over gloo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_distributed import assert_same_run, train_cli

from conftest import write_json
from train_helpers import adapter_info, qa_records

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")


def test_ddp_over_every_gpu_matches_one_gpu(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_json(tmp_path / "qa.json", qa_records(64))
    gpus = torch.cuda.device_count()
    train_cli(tiny_llama, tmp_path / "one", data, "--max-steps", "4", "--nproc-per-node", "1")
    train_cli(tiny_llama, tmp_path / "all", data, "--max-steps", "4")  # default: one process per visible GPU
    plan = adapter_info(tmp_path / "all")["plan"]
    assert (plan["strategy"], plan["world_size"], plan["device"]) == ("ddp", gpus, "cuda")
    assert_same_run(tmp_path / "one", tmp_path / "all")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp2_over_every_gpu_matches_one_gpu(tmp_path: Path, tiny_llama: Path, method: str) -> None:
    """QLoRA included: the 4-bit storage is sharded as bf16/fp32 tensors (bnb_4bit_quant_storage), not uint8."""
    data = write_json(tmp_path / "qa.json", qa_records(64))
    flags = ["--max-steps", "4", "--method", method]
    train_cli(tiny_llama, tmp_path / "one", data, *flags, "--nproc-per-node", "1")
    train_cli(tiny_llama, tmp_path / "all", data, *flags, "--strategy", "fsdp2",
              "--nproc-per-node", str(torch.cuda.device_count()))  # fmt: skip
    assert adapter_info(tmp_path / "all")["plan"]["strategy"] == "fsdp2"
    assert_same_run(tmp_path / "one", tmp_path / "all")
