"""Where a model lives: `$LLMBOX_HOME/models/<name>/` (model/, lora/, checkpoints/, logs/), or any folder.

MODEL on the command line is an installed name or a path. A path may be a model directory (holding
`model/`) or a bare Hugging Face folder, whose artifacts then go beside its weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmbox.errors import UserError


def llmbox_home() -> Path:
    return Path(os.environ.get("LLMBOX_HOME", "~/.llmbox")).expanduser()


@dataclass(frozen=True)
class ModelHome:
    root: Path  # lora/, checkpoints/, logs/ and training_history.png go here
    weights: Path  # the Hugging Face folder

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def name(self) -> str:
        """What training and serving call the model (its directory's name), also inside a container."""
        return self.root.name


def resolve_model(spec: str) -> ModelHome:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "model" / "config.json").is_file():
            return ModelHome(path, path / "model")
        if (path / "config.json").is_file():
            return ModelHome(path, path)
        raise UserError(f"{spec}: not a model folder (no config.json, nor model/config.json)")
    named = llmbox_home() / "models" / spec
    if "/" not in spec and named.is_dir():
        return resolve_model(str(named))
    raise UserError(f"{spec}: no such model folder, and no model of that name in {llmbox_home() / 'models'}")
