"""`llmbox doctor`: is this machine ready to train and serve in containers? Each problem comes with its fix."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmbox.facts import GpuFacts, read_gpu_facts
from llmbox.model_home import llmbox_home
from llmbox.runtime import docker

Status = Literal["ok", "warn", "fail"]
MIN_FREE_DISK = 20 * 1024**3

NVIDIA_RUNTIME_FIX = (
    "install the NVIDIA Container Toolkit (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/), "
    "then: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def docker_info() -> dict[str, object] | None:
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "info", "--format", "{{json .}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    info = json.loads(probe.stdout)
    return info if isinstance(info, dict) else None


def nvidia_runtime(info: dict[str, object] | None) -> bool:
    runtimes = info.get("Runtimes") if info else None
    return isinstance(runtimes, dict) and "nvidia" in runtimes


def check_docker(info: dict[str, object] | None) -> list[Check]:
    if shutil.which("docker") is None:
        fix = "install Docker Engine (https://docs.docker.com/engine/install/), or use --runtime local"
        return [Check("docker", "fail", "the docker command is not installed", fix)]
    if info is None:
        return [Check("docker daemon", "fail", "the docker command is there but no daemon answers",
                      "start it: sudo systemctl start docker (and add yourself to the docker group)")]  # fmt: skip
    return [Check("docker daemon", "ok", f"Docker {info.get('ServerVersion', '?')} answers")]


def check_gpus(gpus: list[GpuFacts], info: dict[str, object] | None) -> list[Check]:
    if not gpus:
        return [Check("GPUs", "warn", "no NVIDIA GPU or driver visible through NVML: training runs on the CPU",
                      "for GPU training install the NVIDIA driver; nvidia-smi must list your GPUs")]  # fmt: skip
    checks = [
        Check(f"GPU {g.index}", "ok" if g.free_bytes > 2 * 1024**3 else "warn",
              f"{g.name}, compute capability {g.compute_capability[0]}.{g.compute_capability[1]}, "
              f"{g.free_bytes / 1024**3:.1f} of {g.total_bytes / 1024**3:.1f} GiB free",
              "" if g.free_bytes > 2 * 1024**3 else "another process holds this GPU's memory (see nvidia-smi)")
        for g in gpus
    ]  # fmt: skip
    if info is not None and not nvidia_runtime(info):
        checks.append(
            Check("NVIDIA container runtime", "fail", "Docker cannot give containers the GPUs", NVIDIA_RUNTIME_FIX)
        )
    elif info is not None:
        checks.append(Check("NVIDIA runtime", "ok", "Docker can give containers the GPUs"))
    return checks


def check_disk(path: Path) -> Check:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    status: Status = "ok" if free >= MIN_FREE_DISK else "warn"
    fix = "" if status == "ok" else "free space or point LLMBOX_HOME elsewhere: models and checkpoints need room"
    return Check("disk", status, f"{free / 1024**3:.0f} GiB free at {path}", fix)


def check_image(gpus: list[GpuFacts], info: dict[str, object] | None) -> Check:
    image = docker.CUDA_IMAGE if gpus else docker.CPU_IMAGE
    if info is None:
        return Check("engine image", "warn", f"{image}: cannot tell without a Docker daemon")
    if docker.image_exists(image):
        return Check("engine image", "ok", f"{image} is built")
    return Check("engine image", "warn", f"{image} is not built yet (train and serve build it on first use)",
                 "llmbox build" + ("" if gpus else " --cpu"))  # fmt: skip


def run_checks() -> list[Check]:
    info = docker_info()
    gpus = read_gpu_facts()
    return [*check_docker(info), *check_gpus(gpus, info), check_disk(llmbox_home()), check_image(gpus, info)]
