"""llama.cpp itself (the prebuilt `xllamacpp` binding), as a reader of our GGUF files independent of ours."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any


def llama_cpp_complete(
    gguf: Path, prompt: list[int] | str, max_tokens: int = 8, lora: Path | None = None, ignore_eos: bool = True
) -> dict[str, Any]:
    """Greedy completion of `prompt` (token ids or text) by llama.cpp's own server (its native /completion
    endpoint, which returns the generated token ids): {"text", "tokens", "top": [(id, logprob), ...] of the first
    generated position}. `ignore_eos`: go on past end-of-turn tokens, as transformers' generate does."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 512
    params.warmup = False
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    if lora is not None:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(lora), 1.0)]
    server = xllamacpp.Server(params)  # also listens on a free port of 127.0.0.1
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
            "seed": 0, "cache_prompt": False, "return_tokens": True, "n_probs": 3,
            "ignore_eos": ignore_eos}  # fmt: skip
    request = urllib.request.Request(
        f"{server.listening_address}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            out = json.loads(response.read())
    finally:
        del server
    probabilities = out.get("completion_probabilities") or []
    return {
        "text": out["content"],
        "tokens": list(out["tokens"]),
        "top": [(d["id"], d["logprob"]) for d in probabilities[0]["top_logprobs"]] if probabilities else [],
    }
