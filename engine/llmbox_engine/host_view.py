"""What the host knows and a container cannot see: the model's name, and where each mount comes from.

Inside a container the weights are at /model and the model directory at /work, so names and paths taken from
them would read "model" and "/work/lora". The host CLI passes the truth in two environment variables
(`LLMBOX_MODEL_NAME`, `LLMBOX_HOST_PATHS`: a JSON map of mount target -> host source); without them (the local
runtime) paths are already the host's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

MODEL_NAME_ENV = "LLMBOX_MODEL_NAME"
HOST_PATHS_ENV = "LLMBOX_HOST_PATHS"


def model_directory(model_path: Path) -> Path:
    """Where lora/ and checkpoints/ go: beside an installed model's `model/` weights, or in a bare HF folder."""
    return model_path.parent if model_path.name == "model" else model_path


def model_name(model_path: Path) -> str:
    """The model directory's name (`smollm2-135m`), not its weights folder's (`model`), as training names it."""
    given = os.environ.get(MODEL_NAME_ENV, "").strip()
    if given:
        return given
    return model_directory(model_path).name or "model"


def host_path(path: Path | str) -> str:
    """`path` as the user sees it on the host: the deepest mount that holds it mapped back to its source."""
    try:
        mounts: dict[str, str] = json.loads(os.environ.get(HOST_PATHS_ENV) or "{}")
    except json.JSONDecodeError:
        return str(path)
    inside = PurePosixPath(str(path))
    for target in sorted(mounts, key=len, reverse=True):
        if inside == PurePosixPath(target) or PurePosixPath(target) in inside.parents:
            return str(Path(mounts[target]) / inside.relative_to(target))
    return str(path)
