"""What training leaves on disk, always written atomically.

    <output>/lora/                 the published adapter: adapter_config.json, adapter_model.safetensors,
                                   adapter_info.json (lora.prev/ keeps the one before)
    <output>/checkpoints/          checkpoint-N/ (pruned to a limit), best/, last/
    <output>/logs/training/<run>/  TensorBoard events
    <output>/training_history.png

Every folder is written beside its final name and renamed into place, so a reader (the server, a resumed
run) sees the old folder or the new one, never half of one. A checkpoint also carries a manifest, written
last, with each file's size and hash: a checkpoint damaged afterwards (a disk that filled while copying,
a file truncated by hand) is told from a whole one, and `--resume` passes over it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmbox.errors import UserError
from llmbox_engine.atomic import staged_dir, write_json

ADAPTER_INFO = "adapter_info.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_FILES = ("adapter_config.json", ADAPTER_WEIGHTS, TRAINING_STATE, TRAINER_STATE)


def publish_adapter(source: Path, lora_dir: Path, info: dict[str, Any]) -> Path:
    """Copy a checkpoint's adapter to `lora_dir` with its info; the previous adapter becomes `lora.prev`."""
    with staged_dir(lora_dir, keep_previous=lora_dir.with_name(f"{lora_dir.name}.prev")) as staging:
        for name in ("adapter_config.json", ADAPTER_WEIGHTS):
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


def seal_checkpoint(folder: Path) -> None:
    """Write the manifest, last: each file's size and hash."""
    files = {
        path.name: {"bytes": path.stat().st_size, "blake2b": file_digest(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    write_json(folder / MANIFEST, {"files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint, or None when it is."""
    if not folder.is_dir():
        return "no such folder"
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not (folder / MANIFEST).is_file():
        return None  # saved before checkpoints had manifests: whole as far as can be told
    try:
        sealed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} unreadable"
    for name, expected in sealed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} holds {size} bytes of the {expected['bytes']} saved (truncated)"
        if file_digest(path) != expected["blake2b"]:
            return f"{name} is not what was saved (its hash differs)"
    return None


def checkpoint_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_whole_checkpoint(checkpoints: Path, warn: Callable[[str], None]) -> Path | None:
    """The whole checkpoint with the most steps (last/ on a tie); each damaged one is named in a warning."""
    found: list[tuple[int, Path]] = []
    for folder in [checkpoints / "last", *reversed(numbered_checkpoints(checkpoints))]:
        if not folder.is_dir():
            continue
        problem = checkpoint_problem(folder)
        if problem is not None:
            warn(f"skipping {folder}: {problem}")
            continue
        found.append((checkpoint_step(folder) or 0, folder))
    return max(found, key=lambda item: item[0])[1] if found else None


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def write_errors_reported(what: str, lora_dir: Path, shown: Callable[[Path], str]) -> Iterator[None]:
    """A failed write (a full disk, a read-only or unwritable folder) as one error line that says what is safe."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        if (lora_dir / ADAPTER_WEIGHTS).is_file():
            kept = f"the adapter published before is untouched in {shown(lora_dir)}"
        else:
            kept = "no adapter was published yet"
        raise UserError(
            f"writing {what} failed: {write_failure(exc)}. {kept}; make room (or fix the folder's permissions) "
            "and run again with --resume: it continues from the last complete checkpoint"
        ) from None


def write_failure(exc: BaseException) -> str:
    """The operating system's words for a failed write; safetensors wraps them in its own message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc))
    return found.group(1) if found else str(exc)
