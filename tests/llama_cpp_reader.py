"""llama.cpp itself (the prebuilt `xllamacpp` binding), as a reader of our GGUF files independent of ours."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def llama_cpp_server(gguf: Path, lora: Path | None = None) -> Iterator[str]:
    """llama.cpp's own server on `gguf` (with a LoRA GGUF applied), listening on a free port of 127.0.0.1: its URL."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 512
    params.warmup = False
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    if lora is not None:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(lora), 1.0)]
    server = xllamacpp.Server(params)
    try:
        yield str(server.listening_address)
    finally:
        del server


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def complete(url: str, prompt: list[int] | str, max_tokens: int = 8, ignore_eos: bool = True) -> dict[str, Any]:
    """Greedy completion through the native /completion endpoint, which returns the generated token ids:
    {"text", "tokens", "top": [(id, logprob), ...] of the first generated position}. `ignore_eos`: go on past
    end-of-turn tokens, as transformers' generate does."""
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
            "seed": 0, "cache_prompt": False, "return_tokens": True, "n_probs": 3,
            "ignore_eos": ignore_eos}  # fmt: skip
    out = post(url, "/completion", body)
    probabilities = out.get("completion_probabilities") or []
    return {
        "text": out["content"],
        "tokens": list(out["tokens"]),
        "top": [(d["id"], d["logprob"]) for d in probabilities[0]["top_logprobs"]] if probabilities else [],
    }


def tokenize(url: str, text: str, add_special: bool = False) -> list[int]:
    return list(post(url, "/tokenize", {"content": text, "add_special": add_special})["tokens"])


def llama_cpp_complete(
    gguf: Path, prompt: list[int] | str, max_tokens: int = 8, lora: Path | None = None, ignore_eos: bool = True
) -> dict[str, Any]:
    """One completion on a server started for it."""
    with llama_cpp_server(gguf, lora) as url:
        return complete(url, prompt, max_tokens, ignore_eos)
