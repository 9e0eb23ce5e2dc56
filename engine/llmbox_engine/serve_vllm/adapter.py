"""An adapter as vLLM will take it: checked and snapshotted without torch, so vLLM's errors become ours, earlier.

vLLM reads an adapter folder when it is loaded, and again whenever its LoRA cache evicts and needs it: serving
`lora/` itself would let a later publish change an adapter under a request still using it. Each adapter is
therefore copied to a snapshot folder of its own (small: megabytes) that lives as long as the server.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbox_engine.host_view import host_path
from llmbox_engine.serve.watch import (
    CONFIG_FILE,
    WEIGHT_FILES,
    AdapterError,
    Signature,
    read_info,
    read_json,
    signature,
)
from llmbox_engine.train.artifacts import ADAPTER_INFO

# the values vLLM's --max-lora-rank accepts (its LoRAConfig refuses others)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# layers whose LoRA vLLM refuses ("unsupported LoRA weight"): the embeddings and the output head
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings")


@dataclass(frozen=True)
class VllmAdapter:
    path: Path  # the snapshot vLLM loads
    source: Path  # the folder it was copied from (lora/)
    rank: int  # the largest rank of any module
    info: dict[str, Any]  # adapter_info.json ({} without one)
    signature: Signature | None  # of the source when it was copied

    def describe(self) -> str:
        created = self.info.get("created_at") or "at an unknown date"
        return f"{host_path(self.source)} (trained {created}, rank {self.rank})"


def max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def check_for_vllm(folder: Path) -> int:
    """The adapter's largest rank; AdapterError naming the module when vLLM could not serve it."""
    rank = _largest_rank(folder)
    max_lora_rank(rank)  # a rank beyond any --max-lora-rank is refused here, with the adapter's other faults
    return rank


def _largest_rank(folder: Path) -> int:
    config = read_json(folder / CONFIG_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder / CONFIG_FILE}: a {config['peft_type']} adapter; vLLM serves LoRA adapters only")
    way_out = "serve it with `--engine llmbox`, or train without it"
    if config.get("use_dora"):
        raise AdapterError(f"{folder / CONFIG_FILE}: a DoRA adapter (use_dora); vLLM cannot serve DoRA: {way_out}")
    if config.get("modules_to_save"):
        saved = ", ".join(config["modules_to_save"])
        raise AdapterError(
            f"{folder / CONFIG_FILE}: modules_to_save ({saved}) are trained in full, which vLLM cannot serve: "
            f"{way_out}, or merge it (`llmbox export --format hf`) and serve the merged model"
        )
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise AdapterError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")
    if weights.suffix != ".safetensors":  # a pickle cannot be read without torch: vLLM checks it when loading
        return _config_rank(config, folder)
    ranks = []
    for key, entry in _safetensors_header(weights).items():
        if key == "__metadata__":
            continue
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if module.rsplit(".", 1)[-1] in EMBEDDING_MODULES or ".lora_embedding_" in key:
            raise AdapterError(
                f"{weights}: {key}: a LoRA on the embeddings or output head ({module}), which vLLM cannot serve: "
                f"{way_out}"
            )
        if ".lora_" not in key:
            raise AdapterError(f"{weights}: {key}: not a LoRA weight (a module trained in full?): {way_out}")
        if ".lora_A" in key:
            ranks.append(int(entry["shape"][0]))
    if not ranks:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    return max(ranks)


def snapshot(folder: Path, into: Path) -> VllmAdapter:
    """Check `folder` and copy it to `into`; AdapterError when it cannot be served, or changed while copying."""
    before = signature(folder)
    if before is None:
        raise AdapterError(f"{folder}: no such folder")
    rank = check_for_vllm(folder)
    into.mkdir(parents=True)
    for name in (CONFIG_FILE, ADAPTER_INFO, *WEIGHT_FILES):
        if (folder / name).is_file():
            shutil.copy2(folder / name, into / name)
    if signature(folder) != before:  # training published again mid-copy: the watcher will offer the new one
        shutil.rmtree(into, ignore_errors=True)
        raise AdapterError(f"{folder}: replaced while it was being read; the newer adapter follows")
    return VllmAdapter(path=into, source=folder, rank=rank, info=read_info(into), signature=before)


def _config_rank(config: dict[str, Any], folder: Path) -> int:
    ranks = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"{folder / CONFIG_FILE}: r and rank_pattern must be positive integers")
    return max(ranks)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor names and shapes a safetensors file starts with: an 8-byte length, then that much JSON."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length)) if length < 100_000_000 else None
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (bad header)")
    return header
