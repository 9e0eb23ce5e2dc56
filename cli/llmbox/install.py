"""`llmbox install`: a model directory under $LLMBOX_HOME/models/<name> from a hub id, a folder or a GGUF file."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

from llmbox.errors import UserError
from llmbox.model_home import llmbox_home

SCRIPTS = {
    # the guide's `cd model_dir && ./train.sh --data ...` works as written
    "train.sh": '#!/bin/sh\ncd "$(dirname "$0")" && exec llmbox train . "$@"\n',
    "start.sh": '#!/bin/sh\ncd "$(dirname "$0")" && exec llmbox serve . "$@"\n',
}
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken")


def default_name(source: str) -> str:
    stem = Path(source).stem if source.endswith(".gguf") else source.rstrip("/").split("/")[-1]
    stem = re.sub(r"\.(q\d\w*|f16|f32|bf16)$", "", stem, flags=re.IGNORECASE)  # GGUF quantization suffixes
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "model"


def model_dir_for(name: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"model name {name!r} may only hold letters, digits, '.', '_' and '-'")
    return llmbox_home() / "models" / name


def prepare(name: str, force: bool) -> Path:
    home = model_dir_for(name)
    if (home / "model").exists():
        if not force:
            raise UserError(f"{home} already holds a model: pick another --name, or --force to replace its weights")
        shutil.rmtree(home / "model")
    home.mkdir(parents=True, exist_ok=True)
    return home


def copy_local_folder(source: Path, target: Path) -> None:
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: not a Hugging Face model folder (no config.json)")
    staging = target.with_name(".model.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for pattern in WEIGHT_PATTERNS:
        for path in source.glob(pattern):
            shutil.copy2(path, staging / path.name)
    staging.rename(target)


def download_from_hub(repo_id: str, target: Path) -> None:
    from huggingface_hub import snapshot_download  # token from HF_TOKEN, as huggingface_hub reads it

    try:
        snapshot_download(repo_id, local_dir=str(target), allow_patterns=list(WEIGHT_PATTERNS))
    except Exception as exc:  # the hub client raises many types: missing repo, gated, offline
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(
            f"{repo_id}: download failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def write_scripts(home: Path) -> None:
    for name, body in SCRIPTS.items():
        path = home / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
