"""Two machines training together, here as two `llmbox train` commands on one host (torchrun's static rendezvous
on 127.0.0.1, gloo; node 0 placed by flags, node 1 by PET_* variables): they make the same updates as one process
on the same global batches, node 0 alone writes, and nodes given different data stop at once with an error naming
the node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_distributed import BATCHES, EXACT, assert_same_run, train_cli

from conftest import free_port, write_json
from train_helpers import adapter_info, qa_records


def start_node(model: Path, rank: int, out: Path, data: Path, port: int) -> subprocess.Popen[str]:
    """Node 0 is told its place by flags; node 1 by the PET_* variables, as the Kubeflow Trainer tells its pods."""
    command = [str(Path(sys.executable).with_name("llmbox")), "train", str(model), "--runtime", "local",
               "--data", str(data), "--output", str(out), "--no-tensorboard", "--skip-test", *EXACT, *BATCHES,
               "--max-steps", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if rank == 0:
        command += ["--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(port),
                    "--nproc-per-node", "1"]  # fmt: skip
    else:
        env |= {"PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port), "PET_NPROC_PER_NODE": "1"}  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_nodes(model: Path, tmp_path: Path, data: list[Path]) -> list[tuple[int, str, str]]:
    port = free_port()
    nodes = [start_node(model, rank, tmp_path / f"node{rank}", data[rank], port) for rank in range(2)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        results.append((node.returncode, stdout, stderr))
    return results


def test_two_nodes_make_the_same_updates_as_one_process_and_node_0_alone_writes(
    tiny_llama: Path, tmp_path: Path
) -> None:
    data = write_json(tmp_path / "data0" / "qa.json", qa_records(40))
    copy = tmp_path / "data1" / "qa.json"  # each machine reads its own copy
    copy.parent.mkdir()
    shutil.copy(data, copy)
    train_cli(tiny_llama, tmp_path / "one", data, "--max-steps", "4")
    (code0, out0, err0), (code1, out1, err1) = run_nodes(tiny_llama, tmp_path, [data, copy])
    assert code0 == 0 and code1 == 0, out0[-2000:] + err0[-2000:] + out1[-2000:] + err1[-2000:]
    assert "2 = 2 nodes x 1 (ddp)" in out0 and "Training plan for" not in out1  # rank 0 prints, once
    assert_same_run(tmp_path / "one", tmp_path / "node0")
    plan = adapter_info(tmp_path / "node0")["plan"]
    assert (plan["world_size"], plan["nnodes"], plan["strategy"]) == (2, 2, "ddp")
    assert not (tmp_path / "node1").exists() or not any((tmp_path / "node1").iterdir())


def test_nodes_given_different_data_stop_naming_the_node(tiny_llama: Path, tmp_path: Path) -> None:
    ours = write_json(tmp_path / "data0" / "qa.json", qa_records(40))
    theirs = write_json(tmp_path / "data1" / "qa.json", qa_records(40, seed=1))
    results = run_nodes(tiny_llama, tmp_path, [ours, theirs])
    for code, stdout, stderr in results:
        assert code != 0, stdout + stderr
    shown = results[0][2] + results[1][2]
    assert "the training data on node 1 differs from node 0's" in shown, shown
    assert "Traceback" not in results[0][2] and "Traceback" not in results[1][2]
    assert not (tmp_path / "node0" / "lora").exists()
