"""`llmbox list`: the installed models, what they are, and whether they have a trained adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmbox.errors import UserError
from llmbox.facts import model_facts_from_config
from llmbox.model_facts import read_config
from llmbox.model_home import llmbox_home, resolve_model


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    family: str
    params: int | None
    handler: str
    adapter: bool
    final_loss: float | None
    problem: str | None = None


def installed_models() -> list[InstalledModel]:
    root = llmbox_home() / "models"
    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        found.append(describe(folder))
    return found


def describe(folder: Path) -> InstalledModel:
    try:
        home = resolve_model(str(folder))
        facts = model_facts_from_config(read_config(home.weights))
    except UserError as exc:
        return InstalledModel(folder.name, folder, "?", None, "?", False, None, problem=str(exc))
    info_path = home.lora / "adapter_info.json"
    final = None
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        final = info.get("final_val_loss") or info.get("final_train_loss")
    return InstalledModel(
        folder.name, folder, facts.model_type, facts.n_params, facts.handler, info_path.is_file(), final
    )
