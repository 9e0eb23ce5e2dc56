"""What training leaves on disk, always written atomically.

    <output>/lora/                 the published adapter: adapter_config.json, adapter_model.safetensors,
                                   adapter_info.json (lora.prev/ keeps the one before)
    <output>/checkpoints/          checkpoint-N/ (pruned to a limit), best/, last/
    <output>/logs/training/<run>/  TensorBoard events
    <output>/training_history.png

Every folder is written beside its final name and renamed into place, so a reader (the server, a resumed
run) sees the old folder or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from llmbox_engine.atomic import staged_dir, write_json

ADAPTER_INFO = "adapter_info.json"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"


def publish_adapter(source: Path, lora_dir: Path, info: dict[str, Any]) -> Path:
    """Copy a checkpoint's adapter to `lora_dir` with its info; the previous adapter becomes `lora.prev`."""
    with staged_dir(lora_dir, keep_previous=lora_dir.with_name(f"{lora_dir.name}.prev")) as staging:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(source / name, staging / name)
        write_json(staging / ADAPTER_INFO, info)
    return lora_dir


def numbered_checkpoints(checkpoints: Path) -> list[Path]:
    found = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prune_checkpoints(checkpoints: Path, keep: int) -> list[Path]:
    """Remove the oldest numbered checkpoints beyond `keep` (best/ and last/ are copies, never pruned)."""
    numbered = numbered_checkpoints(checkpoints)
    removed = numbered[: max(0, len(numbered) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def copy_checkpoint(source: Path, target: Path) -> None:
    with staged_dir(target) as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the base weights cheaply: config.json plus each weight file's name, size and first MiB."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
    return digest.hexdigest()
